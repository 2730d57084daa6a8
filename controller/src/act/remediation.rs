//! Pluggable remediation: the steps of a domain's escalation ladder. Built-ins act through
//! deadline-bounded libvirt calls; `exec` runs an operator's command (argv, no shell) with a
//! timeout. Each step looks at the domain's state right before it acts and leaves alone what it
//! must not touch (a pause for migration, snapshot or save; a shutdown in progress; a guest that
//! suspended itself). Every step is followed by re-observing the domain (done by the caller),
//! so success means "running again".

use std::collections::HashMap;
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use virtwarden_policies::{BootDevice, RemediationAction};

use super::boot_xml::rewrite_boot_order;
use super::calls::{CallError, Calls};
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
    #[error("rewriting the boot order: {0}")]
    BootXml(#[from] super::boot_xml::BootXmlError),
    #[error("domain {0} does not exist")]
    NoSuchDomain(String),
    #[error("cannot run {}: {source}", program.display())]
    Spawn { program: PathBuf, source: std::io::Error },
    #[error("{} timed out after {timeout:?} and was killed", program.display())]
    Timeout { program: PathBuf, timeout: Duration },
    #[error("{} exited with {status}{}", program.display(), if stderr.is_empty() { String::new() } else { format!(": {stderr}") })]
    Exit { program: PathBuf, status: std::process::ExitStatus, stderr: String },
    #[error("{} was stopped: the domain's policy changed or virtwarden is stopping", program.display())]
    Cancelled { program: PathBuf },
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
    pub fn with_builtins() -> Self {
        let mut r = Registry { map: HashMap::new() };
        r.register(RemediationAction::Start, Box::new(StartRemediation));
        r.register(RemediationAction::Reset, Box::new(ResetRemediation));
        r.register(RemediationAction::DestroyStart, Box::new(DestroyStartRemediation));
        r.register(RemediationAction::RedefineBootOrder, Box::new(RedefineBootOrderRemediation));
        r.register(RemediationAction::Exec, Box::new(ExecRemediation));
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

/// Runs the step's command; when it exits 0 and the domain is still down, brings it up.
struct ExecRemediation;
impl Remediation for ExecRemediation {
    fn run<'a>(&'a self, ctx: &'a RemediationContext, calls: &'a Calls) -> StepFuture<'a> {
        Box::pin(async move {
            let hook_ctx = ctx.clone();
            // Abandoning this future (a policy change, shutdown) kills the hook.
            let cancel = CancelOnDrop(Arc::new(AtomicBool::new(false)));
            let flag = cancel.0.clone();
            match tokio::task::spawn_blocking(move || run_hook_until(&hook_ctx, &flag)).await {
                Ok(r) => r?,
                Err(e) => {
                    return Err(RemediationError::Spawn { program: PathBuf::new(), source: std::io::Error::other(e) })
                }
            }
            bring_up(calls, &ctx.domain).await
        })
    }

    fn cancellable(&self) -> bool {
        true
    }
}

/// Sets its flag when dropped: tells a blocking hook runner to kill the hook.
struct CancelOnDrop(Arc<AtomicBool>);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

/// How often a running hook is checked on.
const HOOK_POLL: Duration = Duration::from_millis(20);
/// Bytes of a failed hook's stderr kept for the status.
const STDERR_KEEP: usize = 512;

/// Run an exec step's command: argv without a shell, the VIRTWARDEN_* environment, killed after
/// its timeout. Exit 0 is success.
pub fn run_hook(ctx: &RemediationContext) -> Result<(), RemediationError> {
    run_hook_until(ctx, &AtomicBool::new(false))
}

/// [`run_hook`], killing the hook as soon as `cancel` is set.
pub fn run_hook_until(ctx: &RemediationContext, cancel: &AtomicBool) -> Result<(), RemediationError> {
    let Some((program, args)) = ctx.step.command.split_first() else {
        return Err(RemediationError::Spawn {
            program: PathBuf::new(),
            source: std::io::Error::new(std::io::ErrorKind::InvalidInput, "empty command"),
        });
    };
    let program = PathBuf::from(program);
    let spawn = || {
        Command::new(&program)
            .args(args)
            .env("VIRTWARDEN_DOMAIN", &ctx.domain)
            .env("VIRTWARDEN_UUID", &ctx.uuid)
            .env("VIRTWARDEN_REASON", &ctx.reason)
            .env("VIRTWARDEN_ATTEMPT", ctx.attempt.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
    };
    // ETXTBSY: the hook was just written and another process still holds it open for writing
    // (an update in progress, or a concurrent fork); it clears within milliseconds.
    let mut tries = 0;
    let mut child = loop {
        match spawn() {
            Err(e) if e.raw_os_error() == Some(libc::ETXTBSY) && tries < 10 => {
                tries += 1;
                std::thread::sleep(Duration::from_millis(10));
            }
            other => break other.map_err(|source| RemediationError::Spawn { program: program.clone(), source })?,
        }
    };
    let deadline = Instant::now() + ctx.step.timeout;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if cancel.load(Ordering::SeqCst) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(RemediationError::Cancelled { program });
            }
            Ok(None) if Instant::now() >= deadline => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(RemediationError::Timeout { program, timeout: ctx.step.timeout });
            }
            Ok(None) => std::thread::sleep(HOOK_POLL),
            Err(source) => return Err(RemediationError::Spawn { program, source }),
        }
    };
    if status.success() {
        return Ok(());
    }
    let mut stderr = String::new();
    if let Some(mut pipe) = child.stderr.take() {
        use std::io::Read;
        let mut buf = vec![0u8; STDERR_KEEP];
        let n = pipe.read(&mut buf).unwrap_or(0);
        stderr = String::from_utf8_lossy(&buf[..n]).trim().to_string();
    }
    Err(RemediationError::Exit { program, status, stderr })
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    fn ctx(command: Vec<String>, timeout: Duration) -> RemediationContext {
        RemediationContext {
            domain: "web1".into(),
            uuid: "4dea22b3-1d52-d8f3-2516-782e98a3e001".into(),
            reason: "stopped/failed; shut off (crashed)".into(),
            attempt: 3,
            step: Step { action: RemediationAction::Exec, command, timeout },
            boot: None,
        }
    }

    fn script(dir: &std::path::Path, body: &str) -> String {
        let path = dir.join("hook.sh");
        std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        path.display().to_string()
    }

    #[test]
    fn hook_gets_argv_without_a_shell_and_the_environment() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out");
        let hook = script(
            dir.path(),
            &format!(
                "printf '%s|' \"$@\" \"$VIRTWARDEN_DOMAIN\" \"$VIRTWARDEN_UUID\" \"$VIRTWARDEN_REASON\" \"$VIRTWARDEN_ATTEMPT\" > {}",
                out.display()
            ),
        );
        let argv = vec![hook, "--flag".into(), "two words; $(not run)".into()];
        run_hook(&ctx(argv, Duration::from_secs(5))).unwrap();
        assert_eq!(
            std::fs::read_to_string(out).unwrap(),
            "--flag|two words; $(not run)|web1|4dea22b3-1d52-d8f3-2516-782e98a3e001|stopped/failed; shut off (crashed)|3|"
        );
    }

    #[test]
    fn nonzero_exit_is_a_failure_with_its_stderr() {
        let dir = tempfile::tempdir().unwrap();
        let hook = script(dir.path(), "echo 'disk image missing' >&2\nexit 3");
        match run_hook(&ctx(vec![hook], Duration::from_secs(5))) {
            Err(RemediationError::Exit { status, stderr, .. }) => {
                assert_eq!(status.code(), Some(3));
                assert_eq!(stderr, "disk image missing");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn hook_is_killed_after_its_timeout() {
        let dir = tempfile::tempdir().unwrap();
        let hook = script(dir.path(), "exec sleep 30");
        let started = std::time::Instant::now();
        let r = run_hook(&ctx(vec![hook], Duration::from_millis(200)));
        assert!(matches!(r, Err(RemediationError::Timeout { .. })), "{r:?}");
        assert!(started.elapsed() < Duration::from_secs(10), "the hook must be killed, not waited for");
    }

    #[test]
    fn missing_program_is_reported() {
        let r = run_hook(&ctx(vec!["/nonexistent/hook".into()], Duration::from_secs(1)));
        assert!(matches!(r, Err(RemediationError::Spawn { .. })), "{r:?}");
    }
}
