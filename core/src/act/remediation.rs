//! Pluggable remediation: the steps of a domain's escalation ladder. Built-ins act through
//! deadline-bounded libvirt calls; `exec` runs an operator's command through [`super::hook`].
//! Each step looks at the domain's state right before it acts and leaves alone what it
//! must not touch (a pause for migration, snapshot or save; a shutdown in progress; a guest that
//! suspended itself). Every step is followed by re-observing the domain (done by the caller),
//! so success means "running again".

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;

use virtwarden_policies::{BootDevice, RemediationAction};

use super::boot_xml::rewrite_boot_order;
use super::calls::{CallError, Calls};
use super::hook::{ExecPolicy, Hook, HookError};
use crate::hypervisor::HypervisorError;
use crate::observe::{DomainState, StateReason};
use crate::plan::restart::Step;

/// What a remediation knows about the domain it repairs.
#[derive(Debug, Clone)]
pub struct RemediationContext {
    pub domain: String,
    pub uuid: String,
    /// Why it is being remediated (event detail, state reason, libvirt error).
    pub reason: String,
    /// 1 for the first attempt of a failure streak.
    pub attempt: u32,
    pub step: Step,
    /// The policy's boot order, for `redefine-boot-order`.
    pub boot: Option<Vec<BootDevice>>,
}

#[derive(Debug, thiserror::Error)]
pub enum RemediationError {
    #[error(transparent)]
    Call(#[from] CallError),
    #[error("domain {0} does not exist")]
    NoSuchDomain(String),
    #[error(transparent)]
    Hook(#[from] HookError),
    /// The hook ran and succeeded, then bringing the domain up failed. Not an interruption even
    /// when the call was interrupted: the attempt counts (and backs off), because an uncounted
    /// attempt is tried again at once, which would run the hook again.
    #[error("the hook succeeded, then bringing the domain up failed: {0}")]
    AfterHook(Box<RemediationError>),
    #[error("no remediation registered for `{0}`")]
    Unknown(&'static str),
}

impl From<HypervisorError> for RemediationError {
    fn from(e: HypervisorError) -> Self {
        RemediationError::Call(CallError::Failed(e))
    }
}

impl RemediationError {
    /// Nothing is known about the outcome: the connection was lost or a call never returned.
    pub fn is_interruption(&self) -> bool {
        matches!(self, RemediationError::Call(c) if c.is_interruption())
    }

    /// libvirt's own words where there are any, else the error.
    pub fn detail(&self) -> String {
        match self {
            RemediationError::Call(c) => c.detail(),
            other => other.to_string(),
        }
    }

    /// `path: reason` when an `exec` step was refused (not run), for the status.
    pub fn refused_hook(&self) -> Option<String> {
        match self {
            RemediationError::Hook(e @ HookError::Refused { .. }) => Some(e.to_string()),
            _ => None,
        }
    }
}

/// How a step ended when it did not fail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StepOutcome {
    /// It acted (or found nothing left to do).
    Done,
    /// It found the domain in a state it must not touch, and did nothing.
    LeftAlone(String),
}

/// A remediation step in progress.
pub type StepFuture<'a> = Pin<Box<dyn Future<Output = Result<StepOutcome, RemediationError>> + Send + 'a>>;

/// One kind of repair.
pub trait Remediation: Send + Sync {
    /// Carry the step out.
    fn run<'a>(&'a self, ctx: &'a RemediationContext, calls: &'a Calls) -> StepFuture<'a>;

    /// May the step be abandoned midway (a hook can be; a destroy-then-start is waited out)?
    fn cancellable(&self) -> bool {
        false
    }
}

/// Remediations by action name; the built-ins are registered by [`Registry::with_builtins`].
pub struct Registry {
    map: HashMap<RemediationAction, Box<dyn Remediation>>,
}

impl Registry {
    /// The built-ins, with host-mode `exec` hooks.
    pub fn with_builtins() -> Self {
        Self::with_exec_policy(ExecPolicy::Host)
    }

    /// The built-ins, with `exec` hooks vetted by `exec` (operator mode limits them).
    pub fn with_exec_policy(exec: ExecPolicy) -> Self {
        let mut r = Registry { map: HashMap::new() };
        r.register(RemediationAction::Start, Box::new(StartRemediation));
        r.register(RemediationAction::Reset, Box::new(ResetRemediation));
        r.register(RemediationAction::DestroyStart, Box::new(DestroyStartRemediation));
        r.register(RemediationAction::RedefineBootOrder, Box::new(RedefineBootOrderRemediation));
        r.register(RemediationAction::Exec, Box::new(ExecRemediation { policy: exec }));
        r
    }

    /// Add or replace the implementation of `action`.
    pub fn register(&mut self, action: RemediationAction, remediation: Box<dyn Remediation>) {
        self.map.insert(action, remediation);
    }

    pub fn get(&self, action: RemediationAction) -> Result<&dyn Remediation, RemediationError> {
        self.map.get(&action).map(|b| b.as_ref()).ok_or(RemediationError::Unknown(action.as_str()))
    }
}

/// libvirt/QEMU errors after which resuming a paused guest cannot work, so only a power cycle
/// brings it back: QEMU refuses to continue after a KVM internal error ("Resetting the Virtual
/// Machine is required"), and a guest that crashed while paused has nothing to continue.
const RESUME_IMPOSSIBLE: &[&str] = &["Resetting the Virtual Machine is required", "guest crashed"];

/// Whether a failed resume means the guest can only be power-cycled.
pub fn resume_needs_power_cycle(e: &CallError) -> bool {
    matches!(e, CallError::Failed(h) if RESUME_IMPOSSIBLE.iter().any(|m| h.detail().contains(m)))
}

/// What must not be touched, whatever the ladder says: an operation in progress ends on its own.
fn hands_off(state: DomainState, reason: StateReason) -> Option<String> {
    match state {
        DomainState::Paused if reason.is_operation_in_progress() => {
            Some(format!("paused ({reason}): an operation is in progress"))
        }
        DomainState::ShuttingDown => Some("in shutdown: the guest is shutting down".into()),
        DomainState::PmSuspended => Some("pmsuspended: the guest suspended itself".into()),
        _ => None,
    }
}

async fn current(calls: &Calls, name: &str) -> Result<(DomainState, StateReason), RemediationError> {
    calls.state(name).await?.ok_or_else(|| RemediationError::NoSuchDomain(name.to_string()))
}

async fn power_cycle(calls: &Calls, name: &str) -> Result<StepOutcome, RemediationError> {
    calls.destroy(name).await?;
    calls.start(name).await?;
    Ok(StepOutcome::Done)
}

/// Bring the domain to running from the state it is in now: start it when off, resume it when
/// paused by an error or an admin, power-cycle it when libvirt holds it crashed or a resume
/// cannot work; leave it alone while an operation is in progress.
pub async fn bring_up(calls: &Calls, name: &str) -> Result<StepOutcome, RemediationError> {
    let (state, reason) = current(calls, name).await?;
    if let Some(why) = hands_off(state, reason) {
        return Ok(StepOutcome::LeftAlone(why));
    }
    match state {
        DomainState::Running | DomainState::Blocked => Ok(StepOutcome::Done),
        DomainState::Paused if reason == StateReason::Crashed => power_cycle(calls, name).await,
        DomainState::Paused => match calls.resume(name).await {
            Ok(()) => Ok(StepOutcome::Done),
            Err(e) if resume_needs_power_cycle(&e) => {
                tracing::warn!(domain = name, %e, "resume cannot work; destroying and starting");
                power_cycle(calls, name).await
            }
            Err(e) => Err(e.into()),
        },
        DomainState::Crashed => power_cycle(calls, name).await,
        DomainState::ShutOff | DomainState::NoState => {
            calls.start(name).await?;
            Ok(StepOutcome::Done)
        }
        DomainState::ShuttingDown | DomainState::PmSuspended => Ok(StepOutcome::LeftAlone(state.as_str().into())),
    }
}

/// Destroy the domain if it is active (and may be touched), then start it.
async fn destroy_then_start(calls: &Calls, name: &str) -> Result<StepOutcome, RemediationError> {
    let (state, reason) = current(calls, name).await?;
    if let Some(why) = hands_off(state, reason) {
        return Ok(StepOutcome::LeftAlone(why));
    }
    if state.is_active() {
        calls.destroy(name).await?;
    }
    calls.start(name).await?;
    Ok(StepOutcome::Done)
}

struct StartRemediation;
impl Remediation for StartRemediation {
    fn run<'a>(&'a self, ctx: &'a RemediationContext, calls: &'a Calls) -> StepFuture<'a> {
        Box::pin(bring_up(calls, &ctx.domain))
    }
}

struct ResetRemediation;
impl Remediation for ResetRemediation {
    fn run<'a>(&'a self, ctx: &'a RemediationContext, calls: &'a Calls) -> StepFuture<'a> {
        Box::pin(async move {
            let (state, reason) = current(calls, &ctx.domain).await?;
            if let Some(why) = hands_off(state, reason) {
                return Ok(StepOutcome::LeftAlone(why));
            }
            if matches!(state, DomainState::Running | DomainState::Blocked | DomainState::Paused) {
                calls.reset(&ctx.domain).await?;
            }
            // A reset guest that was paused stays paused; a stopped one needs a start.
            bring_up(calls, &ctx.domain).await
        })
    }
}

struct DestroyStartRemediation;
impl Remediation for DestroyStartRemediation {
    fn run<'a>(&'a self, ctx: &'a RemediationContext, calls: &'a Calls) -> StepFuture<'a> {
        Box::pin(destroy_then_start(calls, &ctx.domain))
    }
}

struct RedefineBootOrderRemediation;
impl Remediation for RedefineBootOrderRemediation {
    fn run<'a>(&'a self, ctx: &'a RemediationContext, calls: &'a Calls) -> StepFuture<'a> {
        Box::pin(async move {
            match &ctx.boot {
                Some(order) => {
                    let (name, order) = (ctx.domain.clone(), order.clone());
                    calls
                        .act("redefine boot order", move |hv| {
                            let xml = hv.persistent_xml(&name)?;
                            let new = rewrite_boot_order(&xml, &order).map_err(|e| HypervisorError::Failed {
                                op: "rewrite boot order",
                                domain: name.clone(),
                                message: e.to_string(),
                            })?;
                            hv.define_xml(&name, &new)
                        })
                        .await?;
                }
                None => tracing::warn!(
                    domain = %ctx.domain,
                    "redefine-boot-order without `boot` in the policy: only restarting"
                ),
            }
            destroy_then_start(calls, &ctx.domain).await
        })
    }
}

/// Runs the step's command through [`super::hook`]; when it exits 0 and the domain is still
/// down, brings it up.
struct ExecRemediation {
    policy: ExecPolicy,
}

impl Remediation for ExecRemediation {
    fn run<'a>(&'a self, ctx: &'a RemediationContext, calls: &'a Calls) -> StepFuture<'a> {
        Box::pin(async move {
            // Abandoning this future (a policy change, shutdown) kills the hook's process group.
            super::hook::run(&Hook::for_remediation(ctx), &self.policy).await?;
            bring_up(calls, &ctx.domain).await.map_err(|e| RemediationError::AfterHook(Box::new(e)))
        })
    }

    fn cancellable(&self) -> bool {
        true
    }
}
