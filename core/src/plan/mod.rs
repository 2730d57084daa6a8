//! The pure planner: desired state × observed state → ordered actions, each with a one-line
//! human reason. No I/O here; everything it reads is a value.

mod domains;
pub mod flap;
pub mod health;
pub mod network;
mod render;
pub mod restart;
pub mod startup;

use serde::Serialize;
use virtwarden_policies::{BootDevice, DesiredState, Duration};

use std::collections::HashMap;

use crate::memory::Memory;
use crate::observe::{ObservedDomain, ObservedHost};

pub use render::render_text;

/// What to do to one domain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case", tag = "kind")]
pub enum ActionKind {
    Start,
    /// Destroy what is left of a crashed domain, then start it.
    Restart,
    Resume,
    /// Graceful shutdown; destroy if it has not stopped after `timeout`.
    Shutdown {
        timeout: Duration,
    },
    Destroy,
    SetAutostart {
        on: bool,
    },
    SetBootOrder {
        order: Vec<BootDevice>,
    },
}

impl ActionKind {
    /// The verb shown after the arrow in a plan line.
    pub fn verb(&self) -> String {
        match self {
            ActionKind::Start => "start".into(),
            ActionKind::Restart => "destroy, then start".into(),
            ActionKind::Resume => "resume".into(),
            ActionKind::Shutdown { timeout } => format!("shut down (destroy after {timeout})"),
            ActionKind::Destroy => "destroy".into(),
            ActionKind::SetAutostart { on } => format!("set autostart {}", on_off(*on)),
            ActionKind::SetBootOrder { order } => format!("set boot order {}", boot_list(order)),
        }
    }

    /// Execution phase: configuration first, then stops, then starts, so a domain starts with
    /// its corrected boot order.
    fn phase(&self) -> u8 {
        match self {
            ActionKind::SetBootOrder { .. } | ActionKind::SetAutostart { .. } => 0,
            ActionKind::Shutdown { .. } | ActionKind::Destroy => 1,
            ActionKind::Start | ActionKind::Restart | ActionKind::Resume => 2,
        }
    }

    /// A short stable name for metrics and JSON (`start`, `set-boot-order`, …).
    pub fn name(&self) -> &'static str {
        match self {
            ActionKind::Start => "start",
            ActionKind::Restart => "restart",
            ActionKind::Resume => "resume",
            ActionKind::Shutdown { .. } => "shutdown",
            ActionKind::Destroy => "destroy",
            ActionKind::SetAutostart { .. } => "set-autostart",
            ActionKind::SetBootOrder { .. } => "set-boot-order",
        }
    }
}

/// One planned change.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Action {
    pub domain: String,
    /// The policy that asks for it.
    pub policy: String,
    #[serde(flatten)]
    pub kind: ActionKind,
    /// Why: what was observed and what the policy wants.
    pub reason: String,
}

impl Action {
    /// `web1: shut off (crashed), policy wants running → start`
    pub fn line(&self) -> String {
        format!("{}: {} → {}", self.domain, self.reason, self.kind.verb())
    }
}

/// How much a note matters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Info,
    Warning,
}

/// Something observed and reported without an action (drift we will not or cannot fix).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Note {
    pub subject: String,
    pub severity: Severity,
    pub message: String,
}

impl Note {
    pub fn line(&self) -> String {
        let tag = match self.severity {
            Severity::Info => "note",
            Severity::Warning => "warning",
        };
        format!("{tag}: {}: {}", self.subject, self.message)
    }
}

/// The plan: network changes first (a domain's bridge must exist before it starts), then
/// domain actions in execution order, plus notes.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Plan {
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub network: Vec<network::NetAction>,
    pub actions: Vec<Action>,
    /// Starts held back by start ordering (`startup:`): what each waits for. Only
    /// [`startup::order_plan`] fills it.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub held: Vec<startup::HeldAction>,
    pub notes: Vec<Note>,
}

impl Plan {
    /// Nothing to do.
    pub fn is_empty(&self) -> bool {
        self.actions.is_empty() && self.network.is_empty() && self.held.is_empty()
    }

    /// Number of planned changes.
    pub fn len(&self) -> usize {
        self.actions.len() + self.network.len()
    }
}

/// Plan every managed domain with nothing remembered (see [`plan_with`]).
pub fn plan(desired: &DesiredState, observed: &ObservedHost) -> Plan {
    plan_with(desired, observed, &Memory::empty())
}

/// Plan every managed domain. `memory` supplies what libvirt forgets across its restarts (why
/// a domain is off); while it is lost, a down domain is left down unless `restart: always`.
/// Domains no policy names never appear in the plan.
pub fn plan_with(desired: &DesiredState, observed: &ObservedHost, memory: &Memory) -> Plan {
    let mut plan = Plan::default();
    let by_name: HashMap<&str, &ObservedDomain> = observed.domains.iter().map(|d| (d.name.as_str(), d)).collect();
    for managed in &desired.domains {
        let name = managed.spec.name.as_str();
        domains::plan_domain(
            managed,
            by_name.get(name).copied(),
            memory.intent(name),
            memory.lost_for(name),
            &mut plan,
        );
    }
    // Stable: by phase, then policy order (sort_by_key is stable).
    plan.actions.sort_by_key(|a| a.kind.phase());
    hold_starts_without_bridge(desired, observed, &mut plan);
    let (network, notes) = network::plan_network(desired, observed);
    plan.network = network;
    plan.notes.extend(notes);
    plan
}

/// The plan of a one-shot `plan` or `apply`: [`plan`] with start ordering applied
/// ([`startup::order_plan`]); `missing_paths` are the required paths that do not exist.
pub fn plan_ordered(
    desired: &DesiredState,
    observed: &ObservedHost,
    missing_paths: &std::collections::HashSet<String>,
) -> Plan {
    plan_ordered_with(desired, observed, missing_paths, &Memory::empty())
}

/// [`plan_ordered`] with what the durable memory remembers (see [`plan_with`]).
pub fn plan_ordered_with(
    desired: &DesiredState,
    observed: &ObservedHost,
    missing_paths: &std::collections::HashSet<String>,
    memory: &Memory,
) -> Plan {
    let mut p = plan_with(desired, observed, memory);
    startup::order_plan(desired, observed, missing_paths, &mut p);
    note_bad_health(desired, memory, &mut p);
    p
}

/// A guest the service last judged unhealthy or not booted (and not seen passing since).
fn note_bad_health(desired: &DesiredState, memory: &Memory, plan: &mut Plan) {
    for managed in desired.domains.iter().filter(|m| m.spec.health.is_some()) {
        let name = &managed.spec.name;
        if let Some(bad) = memory.domains.get(name).and_then(|d| d.bad_health.as_ref()) {
            plan.notes.push(Note {
                subject: name.clone(),
                severity: Severity::Warning,
                message: format!("last known health: {}", bad.describe()),
            });
        }
    }
}

/// A domain whose bridge is missing fails to start (`Cannot get interface MTU`): start it only
/// once the bridge exists or this plan creates it.
fn hold_starts_without_bridge(desired: &DesiredState, observed: &ObservedHost, plan: &mut Plan) {
    let Some(net) = observed.net.as_ref() else {
        return;
    };
    let mut held = Vec::new();
    plan.actions.retain(|a| {
        if !matches!(a.kind, ActionKind::Start | ActionKind::Restart) {
            return true;
        }
        let Some(d) = observed.domain(&a.domain) else {
            return true;
        };
        let missing: Vec<String> = d
            .interfaces
            .iter()
            .filter_map(|i| observed.bridge_of(i))
            .filter(|b| net.link(b).is_none() && desired.bridge(b).is_none())
            .collect();
        if missing.is_empty() {
            return true;
        }
        held.push(Note {
            subject: a.domain.clone(),
            severity: Severity::Warning,
            message: format!("{} → start held: bridge {} does not exist yet", a.reason, missing.join(", ")),
        });
        false
    });
    plan.notes.extend(held);
}

pub(crate) fn on_off(on: bool) -> &'static str {
    if on {
        "on"
    } else {
        "off"
    }
}

pub(crate) fn boot_list(order: &[BootDevice]) -> String {
    let names: Vec<&str> = order.iter().map(|d| d.as_str()).collect();
    format!("[{}]", names.join(", "))
}
