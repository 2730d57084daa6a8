//! Executing one action, and a whole plan followed by verification (nmstate's habit: after
//! applying, observe again and report what did not stick).

use serde::Serialize;
use virtwarden_policies::DesiredState;

use super::boot_xml::{rewrite_boot_order, BootXmlError};
use super::schedule::{run_actions, ApplyOptions};
use crate::hypervisor::{Hypervisor, HypervisorError};
use crate::observe::paths::missing_paths;
use crate::observe::DomainState;
use crate::plan::startup::Wait;
use crate::plan::{plan_ordered, Action, ActionKind, Plan};

#[derive(Debug, thiserror::Error)]
pub enum ActError {
    #[error(transparent)]
    Hypervisor(#[from] HypervisorError),
    #[error("rewriting the boot order of {domain}: {source}")]
    BootXml { domain: String, source: BootXmlError },
}

/// What happened to one action.
#[derive(Debug, Clone, Serialize)]
pub struct ActionOutcome {
    pub action: Action,
    /// `None` on success, else the error text.
    pub error: Option<String>,
    pub millis: u128,
    /// What a start waited for before it could run (start ordering); empty when nothing.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub waited_for: Vec<Wait>,
    /// How long it waited.
    #[serde(skip_serializing_if = "is_zero")]
    pub waited_ms: u128,
    /// Not carried out: what the start still waited for when nothing else could change.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub held: Option<Vec<Wait>>,
}

fn is_zero(n: &u128) -> bool {
    *n == 0
}

/// The result of applying a plan and verifying it.
#[derive(Debug, Clone, Serialize)]
pub struct ApplyReport {
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub network_outcomes: Vec<super::network::NetOutcome>,
    pub outcomes: Vec<ActionOutcome>,
    /// The plan computed from the state observed after applying: empty when converged.
    pub remaining: Plan,
}

impl ApplyReport {
    pub fn failed(&self) -> usize {
        self.outcomes.iter().filter(|o| o.error.is_some()).count()
            + self.network_outcomes.iter().filter(|o| o.error.is_some()).count()
    }

    /// Starts not carried out because what they wait for did not happen.
    pub fn held(&self) -> usize {
        self.outcomes.iter().filter(|o| o.held.is_some()).count()
    }

    /// Every action succeeded and a fresh plan is empty.
    pub fn converged(&self) -> bool {
        self.failed() == 0 && self.held() == 0 && self.remaining.is_empty()
    }
}

/// Carry out one action. Blocks (graceful shutdown waits up to its timeout).
pub fn execute_action(hv: &dyn Hypervisor, action: &Action) -> Result<(), ActError> {
    let name = action.domain.as_str();
    match &action.kind {
        ActionKind::Start => hv.start(name)?,
        ActionKind::Restart => {
            if hv.domain_state(name)?.is_some_and(DomainState::is_active) {
                hv.destroy(name)?;
            }
            hv.start(name)?;
        }
        ActionKind::Resume => hv.resume(name)?,
        ActionKind::Destroy => hv.destroy(name)?,
        ActionKind::Shutdown { timeout } => super::shutdown::graceful_shutdown(hv, name, timeout.as_std())?,
        ActionKind::SetAutostart { on } => hv.set_autostart(name, *on)?,
        ActionKind::SetBootOrder { order } => {
            let xml = hv.persistent_xml(name)?;
            let new = rewrite_boot_order(&xml, order)
                .map_err(|source| ActError::BootXml { domain: name.to_string(), source })?;
            hv.define_xml(name, &new)?;
        }
    }
    Ok(())
}

/// Execute `plan` with the default options; see [`apply_plan_with`].
pub fn apply_plan(
    hv: &dyn Hypervisor,
    desired: &DesiredState,
    to_apply: &Plan,
) -> Result<ApplyReport, HypervisorError> {
    apply_plan_with(hv, desired, to_apply, &ApplyOptions::default())
}

/// Execute `plan` — different domains in parallel, each domain's actions in order,
/// configuration before stops before starts, starts as start ordering allows — continuing past
/// failures, then observe again and re-plan. Outcomes are in plan order.
pub fn apply_plan_with(
    hv: &dyn Hypervisor,
    desired: &DesiredState,
    to_apply: &Plan,
    opts: &ApplyOptions,
) -> Result<ApplyReport, HypervisorError> {
    let outcomes = run_actions(hv, desired, &to_apply.actions, opts);
    let observed = hv.observe_host()?;
    let remaining = plan_ordered(desired, &observed, &missing_paths(desired));
    Ok(ApplyReport { network_outcomes: Vec::new(), outcomes, remaining })
}
