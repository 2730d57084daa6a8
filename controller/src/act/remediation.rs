//! Pluggable remediation: the steps of a domain's escalation ladder. Built-ins act through the
//! hypervisor; `exec` runs an operator's command (argv, no shell) with a timeout. Every step is
//! followed by re-observing the domain (done by the caller), so success means "running again".

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use virtwarden_policies::{BootDevice, RemediationAction};

use super::boot_xml::rewrite_boot_order;
use crate::hypervisor::{Hypervisor, HypervisorError};
use crate::observe::DomainState;
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
    Hypervisor(#[from] HypervisorError),
    #[error("rewriting the boot order: {0}")]
    BootXml(#[from] super::boot_xml::BootXmlError),
    #[error("cannot run {}: {source}", program.display())]
    Spawn { program: PathBuf, source: std::io::Error },
    #[error("{} timed out after {timeout:?} and was killed", program.display())]
    Timeout { program: PathBuf, timeout: Duration },
    #[error("{} exited with {status}{}", program.display(), if stderr.is_empty() { String::new() } else { format!(": {stderr}") })]
    Exit { program: PathBuf, status: std::process::ExitStatus, stderr: String },
    #[error("no remediation registered for `{0}`")]
    Unknown(&'static str),
}

/// One kind of repair.
pub trait Remediation: Send + Sync {
    /// Carry the step out. Blocks; callers run it off the async executor.
    fn run(&self, ctx: &RemediationContext, hv: &dyn Hypervisor) -> Result<(), RemediationError>;
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

    pub fn run(&self, ctx: &RemediationContext, hv: &dyn Hypervisor) -> Result<(), RemediationError> {
        let r = self.map.get(&ctx.step.action).ok_or(RemediationError::Unknown(ctx.step.action.as_str()))?;
        r.run(ctx, hv)
    }
}

/// Bring the domain to running from whatever state it is in: start it when off, resume it when
/// paused, destroy-then-start when libvirt holds it crashed.
pub fn bring_up(name: &str, hv: &dyn Hypervisor) -> Result<(), HypervisorError> {
    let Some(state) = hv.domain_state(name)? else {
        return Err(HypervisorError::NoSuchDomain { domain: name.to_string() });
    };
    match state {
        DomainState::Running | DomainState::Blocked => Ok(()),
        // A guest paused by an error may refuse to continue ("Resetting the Virtual Machine is
        // required" after a KVM internal error): then power-cycle it.
        DomainState::Paused => hv.resume(name).or_else(|e| {
            tracing::warn!(domain = name, %e, "resume failed; destroying and starting");
            hv.destroy(name)?;
            hv.start(name)
        }),
        DomainState::Crashed | DomainState::ShuttingDown | DomainState::PmSuspended => {
            hv.destroy(name)?;
            hv.start(name)
        }
        DomainState::ShutOff | DomainState::NoState => hv.start(name),
    }
}

struct StartRemediation;
impl Remediation for StartRemediation {
    fn run(&self, ctx: &RemediationContext, hv: &dyn Hypervisor) -> Result<(), RemediationError> {
        Ok(bring_up(&ctx.domain, hv)?)
    }
}

struct ResetRemediation;
impl Remediation for ResetRemediation {
    fn run(&self, ctx: &RemediationContext, hv: &dyn Hypervisor) -> Result<(), RemediationError> {
        let active = hv
            .domain_state(&ctx.domain)?
            .is_some_and(|s| matches!(s, DomainState::Running | DomainState::Blocked | DomainState::Paused));
        if active {
            hv.reset(&ctx.domain)?;
        }
        // A reset guest that was paused stays paused; a stopped one needs a start.
        Ok(bring_up(&ctx.domain, hv)?)
    }
}

struct DestroyStartRemediation;
impl Remediation for DestroyStartRemediation {
    fn run(&self, ctx: &RemediationContext, hv: &dyn Hypervisor) -> Result<(), RemediationError> {
        if hv.domain_state(&ctx.domain)?.is_some_and(DomainState::is_active) {
            hv.destroy(&ctx.domain)?;
        }
        Ok(hv.start(&ctx.domain)?)
    }
}

struct RedefineBootOrderRemediation;
impl Remediation for RedefineBootOrderRemediation {
    fn run(&self, ctx: &RemediationContext, hv: &dyn Hypervisor) -> Result<(), RemediationError> {
        match &ctx.boot {
            Some(order) => {
                let xml = hv.persistent_xml(&ctx.domain)?;
                hv.define_xml(&ctx.domain, &rewrite_boot_order(&xml, order)?)?;
            }
            None => {
                tracing::warn!(domain = %ctx.domain, "redefine-boot-order without `boot` in the policy: only starting")
            }
        }
        if hv.domain_state(&ctx.domain)?.is_some_and(DomainState::is_active) {
            hv.destroy(&ctx.domain)?;
        }
        Ok(hv.start(&ctx.domain)?)
    }
}

/// Runs the step's command; when it exits 0 and the domain is still down, starts it.
struct ExecRemediation;
impl Remediation for ExecRemediation {
    fn run(&self, ctx: &RemediationContext, hv: &dyn Hypervisor) -> Result<(), RemediationError> {
        run_hook(ctx)?;
        Ok(bring_up(&ctx.domain, hv)?)
    }
}

/// How often a running hook is checked on.
const HOOK_POLL: Duration = Duration::from_millis(20);
/// Bytes of a failed hook's stderr kept for the status.
const STDERR_KEEP: usize = 512;

/// Run an exec step's command: argv without a shell, the VIRTWARDEN_* environment, killed after
/// its timeout. Exit 0 is success.
pub fn run_hook(ctx: &RemediationContext) -> Result<(), RemediationError> {
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
