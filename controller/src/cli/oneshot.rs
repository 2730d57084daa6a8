//! The one-shot commands: `check`, `plan`, `apply` (with its network verify loop), `show`,
//! `diagnose`, `status`, and `release`, `memory confirm` and `reload`, which ask the running
//! service first. Each writes its result to `out`, problems to `err`, and returns the exit code.

use std::io::Write;
use std::path::PathBuf;

use virtwarden_policies::{load_paths_with, LoadError, LoadedPolicies, TrustMode, TrustedOwners};

use super::args::{DiagnoseArgs, Dirs, DocumentFormat, HostArgs, Output, ShowArgs, DEFAULT_POLICIES};
use crate::act::network::{apply_net_actions, observe_net};
use crate::act::{apply_plan_with, ApplyOptions, ApplyReport};
use crate::diagnose::{self, DiagnoseSource, DomainReport, Target};
use crate::exit;
use crate::hostnet::netlink::NetlinkHost;
use crate::hostnet::sysctl::ProcForwarding;
use crate::hypervisor::{DomainReader, Hypervisor};
use crate::libvirt::pool::{connections_for, LibvirtPool};
use crate::libvirt::{resolve_uri, LibvirtHost};
use crate::memory::{Memory, MemoryStore};
use crate::observe::paths::missing_paths;
use crate::observe::{ObservedHost, ObservedNet};
use crate::plan::startup::waits_text;
use crate::plan::{plan_ordered_with, render_text, ActionKind, Plan};

/// `apply` and `run` act as root on what the policy files say, so files that someone other than
/// root (or the service user) could have written are refused.
pub fn enforce_ownership() -> TrustMode {
    TrustMode::Enforce(TrustedOwners::of_this_process())
}

/// `check` and `plan` change nothing: they report ownership problems as warnings, so policies can
/// be checked where they are written (a checkout, a home directory) before they are installed.
pub fn warn_ownership() -> TrustMode {
    TrustMode::Warn(TrustedOwners::of_this_process())
}

/// `plan`: what `apply` would change; exit 3 when there is drift.
pub(super) fn plan(a: &HostArgs, out: &mut dyn Write, err: &mut dyn Write) -> std::io::Result<i32> {
    with_host(a, None, 1, warn_ownership(), err, |ctx| plan_cmd(ctx, a.output, out))
}

/// `apply`: change the host under the host lock, with at most `parallel` domains at once.
pub(super) fn apply(a: &HostArgs, parallel: usize, out: &mut dyn Write, err: &mut dyn Write) -> std::io::Result<i32> {
    with_host(a, Some("apply"), parallel, enforce_ownership(), err, |ctx| {
        apply_cmd(ctx, a.output, &ApplyOptions { parallel }, out)
    })
}

/// `schema`: the JSON Schema of a HostPolicy document.
pub(super) fn schema(out: &mut dyn Write) -> std::io::Result<i32> {
    write!(out, "{}", virtwarden_policies::schema::host_policy_schema_json()).map(|_| exit::OK)
}

/// Load policies; on failure report them on `err` (a failed write must not change the exit
/// code, so it is ignored) and return `None`.
fn load(paths: &[PathBuf], mode: TrustMode, err: &mut dyn Write) -> std::io::Result<Option<LoadedPolicies>> {
    match load_paths_with(paths, mode) {
        Ok(l) => {
            for w in &l.warnings {
                let _ = writeln!(err, "warning: {w}");
            }
            if !l.warnings.is_empty() {
                let _ = writeln!(
                    err,
                    "  note: `apply` and `run` refuse these files\n  hint: {}",
                    virtwarden_policies::load::TRUST_HINT
                );
            }
            Ok(Some(l))
        }
        Err(e @ LoadError::Invalid(_)) => {
            let _ = writeln!(err, "{e}");
            Ok(None)
        }
        Err(e) => {
            let _ = writeln!(err, "error: {e}");
            Ok(None)
        }
    }
}

pub(super) fn check(paths: &[PathBuf], out: &mut dyn Write, err: &mut dyn Write) -> std::io::Result<i32> {
    let Some(loaded) = load(paths, warn_ownership(), err)? else {
        return Ok(exit::INVALID_POLICY);
    };
    for w in exec_hook_warnings(&loaded) {
        writeln!(err, "warning: {w}")?;
    }
    let d = &loaded.desired;
    let fwd: Vec<String> = [("ipv4", &d.ipv4_forwarding), ("ipv6", &d.ipv6_forwarding)]
        .iter()
        .filter_map(|(k, v)| v.as_ref().map(|s| format!("{k}={}", if s.enabled { "on" } else { "off" })))
        .collect();
    writeln!(
        out,
        "ok: {} file(s), {} polic{}: {} domain(s), {} bridge(s), forwarding {}",
        loaded.files.len(),
        d.policies.len(),
        if d.policies.len() == 1 { "y" } else { "ies" },
        d.domains.len(),
        d.bridges.len(),
        if fwd.is_empty() { "unmanaged".to_string() } else { fwd.join(" ") }
    )?;
    Ok(exit::OK)
}

/// `exec` steps whose command does not exist or is not executable here: a warning, not an
/// error (the policy may be checked before the hook is installed), located at the command.
fn exec_hook_warnings(loaded: &LoadedPolicies) -> Vec<virtwarden_policies::Diagnostic> {
    use std::os::unix::fs::PermissionsExt;
    let mut out = Vec::new();
    for doc in &loaded.documents {
        for (i, d) in doc.policy.spec.domains.iter().enumerate() {
            for (j, step) in d.remediation.iter().flatten().enumerate() {
                let Some(program) = step.command.as_ref().and_then(|c| c.first()) else { continue };
                let problem = match std::fs::metadata(program) {
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => "does not exist".to_string(),
                    Err(e) => format!("cannot be read ({e})"),
                    Ok(m) if !m.is_file() => "is not a file".to_string(),
                    Ok(m) if m.permissions().mode() & 0o111 == 0 => "is not executable".to_string(),
                    Ok(_) => continue,
                };
                out.push(doc.diagnostic(
                    &format!("spec.domains[{i}].remediation[{j}].command[0]"),
                    format!("exec hook of domain {}: {program} {problem}; the step fails when it is reached", d.name),
                    Some("install the command (root-owned, mode 0755) or remove the step".into()),
                ));
            }
        }
    }
    out
}

/// The network half of a one-shot run: a netlink connection on a small runtime.
struct NetCtx {
    rt: tokio::runtime::Runtime,
    net: NetlinkHost,
    fwd: ProcForwarding,
    /// Uplink checkpoints and holds: the durable memory for `apply` (which holds the host
    /// lock), an in-process copy of it for `plan`.
    journal: MemoryStore,
}

impl NetCtx {
    fn open(journal: MemoryStore) -> std::io::Result<Self> {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        let net = rt.block_on(async { NetlinkHost::connect() }).map_err(std::io::Error::other)?;
        Ok(NetCtx { rt, net, fwd: ProcForwarding::default(), journal })
    }

    fn observe(&self, desired: &virtwarden_policies::DesiredState) -> std::io::Result<ObservedNet> {
        self.rt.block_on(async {
            let mut n = observe_net(&self.net, &self.fwd).await.map_err(std::io::Error::other)?;
            crate::act::uplink::observe_uplinks(&self.net, &mut n, desired, &self.journal).await;
            Ok(n)
        })
    }

    fn apply(&self, actions: &[crate::plan::network::NetAction]) -> Vec<crate::act::network::NetOutcome> {
        self.rt.block_on(apply_net_actions(&self.net, &self.fwd, &self.journal, actions))
    }
}

/// Everything a one-shot command works with.
struct Ctx<'a> {
    loaded: &'a LoadedPolicies,
    hv: &'a dyn Hypervisor,
    net: Option<NetCtx>,
    /// What the service remembers (why domains are off), read only.
    memory: Memory,
    /// Set when domains to start (or failed starts) are diagnosed.
    diagnosis: Option<(&'a dyn DiagnoseSource, diagnose::Options)>,
}

impl Ctx<'_> {
    fn observe(&self) -> std::io::Result<ObservedHost> {
        let mut host = self.hv.observe_host().map_err(std::io::Error::other)?;
        if let Some(net) = &self.net {
            host.net = Some(net.observe(&self.loaded.desired)?);
        }
        Ok(host)
    }

    fn plan(&self) -> std::io::Result<Plan> {
        let desired = &self.loaded.desired;
        Ok(plan_ordered_with(desired, &self.observe()?, &missing_paths(desired), &self.memory))
    }
}

/// Open what a one-shot command works with; `parallel` calls may be in flight at once (apply),
/// so the libvirt side is a pool of connections sized for them.
fn with_host(
    args: &HostArgs,
    lock_for: Option<&str>,
    parallel: usize,
    mode: TrustMode,
    err: &mut dyn Write,
    body: impl FnOnce(&Ctx) -> std::io::Result<i32>,
) -> std::io::Result<i32> {
    let Some(loaded) = load(&args.paths, mode, err)? else {
        return Ok(exit::INVALID_POLICY);
    };
    // One writer per host: a command that changes the host waits for nobody and changes nothing
    // while `run`, `operator` or another `apply` holds the host.
    let _lock = match lock_for.map(|command| crate::lock::acquire(&args.lock_file, command)).transpose() {
        Ok(l) => l,
        Err(e) => {
            writeln!(err, "error: {e}; nothing was changed")?;
            return Ok(exit::RUNTIME);
        }
    };
    let (memory, problem) = MemoryStore::read_only(&args.data_dir);
    if let Some(p) = problem {
        writeln!(err, "warning: {p}")?;
    }
    let uri = resolve_uri(args.connect.as_deref());
    let network = args.network;
    let host = match LibvirtPool::open(&uri, connections_for(&uri, parallel)) {
        Ok(h) => h,
        Err(e) => {
            writeln!(err, "error: {e}")?;
            return Ok(exit::RUNTIME);
        }
    };
    let net = if network.enabled_for(&uri) {
        let journal = match lock_for.map(|_| MemoryStore::open(&args.data_dir)) {
            Some(Ok((store, _))) => store,
            _ => {
                let store = MemoryStore::in_memory();
                store.update(|m| m.uplinks = memory.uplinks.clone());
                store
            }
        };
        match NetCtx::open(journal) {
            Ok(n) => Some(n),
            Err(e) => {
                writeln!(err, "error: cannot open netlink: {e}")?;
                return Ok(exit::RUNTIME);
            }
        }
    } else {
        None
    };
    let diagnosis = args
        .diagnose
        .enabled_for(&uri)
        .then(|| (&host as &dyn DiagnoseSource, diagnose::Options::for_uri(&uri, network.enabled_for(&uri))));
    let ctx = Ctx { loaded: &loaded, hv: &host, net, memory, diagnosis };
    match body(&ctx) {
        Ok(code) => Ok(code),
        Err(e) => {
            writeln!(err, "error: {e}")?;
            Ok(exit::RUNTIME)
        }
    }
}

fn plan_cmd(ctx: &Ctx, output: Output, out: &mut dyn Write) -> std::io::Result<i32> {
    let p = ctx.plan()?;
    let starts: Vec<&str> = p
        .actions
        .iter()
        .filter(|a| matches!(a.kind, ActionKind::Start | ActionKind::Restart))
        .map(|a| a.domain.as_str())
        .collect();
    let diagnosis = ctx.diagnose(&starts)?;
    match output {
        Output::Text => {
            write!(out, "{}", render_text(&p))?;
            if !diagnosis.is_empty() {
                writeln!(out, "diagnosis of the domains to start:")?;
                write!(out, "{}", diagnose::model::render_findings(&diagnosis))?;
            }
        }
        Output::Json => {
            let json = WithDiagnosis { inner: &p, diagnosis };
            writeln!(out, "{}", serde_json::to_string_pretty(&json).map_err(std::io::Error::other)?)?
        }
    }
    Ok(if p.is_empty() { exit::OK } else { exit::DRIFT })
}

/// A plan or apply report with the diagnosis of its domains beside it (JSON output).
#[derive(serde::Serialize)]
struct WithDiagnosis<'a, T: serde::Serialize> {
    #[serde(flatten)]
    inner: &'a T,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    diagnosis: Vec<DomainReport>,
}

impl Ctx<'_> {
    /// Diagnose `domains` when diagnosis is on; only reports with findings are kept.
    fn diagnose(&self, domains: &[&str]) -> std::io::Result<Vec<DomainReport>> {
        let Some((source, opts)) = &self.diagnosis else { return Ok(Vec::new()) };
        if domains.is_empty() {
            return Ok(Vec::new());
        }
        let targets: Vec<Target> = domains
            .iter()
            .map(|d| Target { domain: d.to_string(), policy: self.loaded.desired.domain(d).map(|m| m.policy.clone()) })
            .collect();
        let report = diagnose::diagnose(*source, &targets, opts).map_err(std::io::Error::other)?;
        Ok(report.domains.into_iter().filter(|d| !d.findings.is_empty()).collect())
    }
}

/// Network changes that did not stick are tried again this many times, with backoff.
const NET_RETRIES: u32 = 3;

fn apply_cmd(ctx: &Ctx, output: Output, opts: &ApplyOptions, out: &mut dyn Write) -> std::io::Result<i32> {
    let p = ctx.plan()?;
    let mut network_outcomes = Vec::new();
    if let Some(net) = &ctx.net {
        network_outcomes = net.apply(&p.network);
    }
    let mut report = apply_plan_with(ctx.hv, &ctx.loaded.desired, &p, opts).map_err(std::io::Error::other)?;
    // Verified against what is remembered too (why domains are off).
    report.remaining = ctx.plan()?;
    if let Some(net) = &ctx.net {
        // Verify the network by reading it back; retry what did not stick.
        let mut delay = std::time::Duration::from_millis(100);
        for _ in 0..NET_RETRIES {
            let again = ctx.plan()?;
            if again.network.is_empty() {
                break;
            }
            std::thread::sleep(delay);
            delay *= 2;
            network_outcomes.extend(net.apply(&again.network));
        }
        report.remaining = ctx.plan()?;
    }
    report.network_outcomes = network_outcomes;
    // A failed start is diagnosed here, after the fact, so the executor stays as it is.
    let failed: Vec<&str> = report
        .outcomes
        .iter()
        .filter(|o| {
            o.error.is_some() && matches!(o.action.kind, ActionKind::Start | ActionKind::Restart | ActionKind::Resume)
        })
        .map(|o| o.action.domain.as_str())
        .collect();
    let diagnosis = ctx.diagnose(&failed)?;
    match output {
        Output::Text => write_apply_text(&p, &report, &diagnosis, out)?,
        Output::Json => {
            let json = WithDiagnosis { inner: &report, diagnosis };
            writeln!(out, "{}", serde_json::to_string_pretty(&json).map_err(std::io::Error::other)?)?
        }
    }
    Ok(if report.converged() { exit::OK } else { exit::RUNTIME })
}

fn write_apply_text(
    p: &Plan,
    report: &ApplyReport,
    diagnosis: &[DomainReport],
    out: &mut dyn Write,
) -> std::io::Result<()> {
    writeln!(out, "plan:")?;
    for line in render_text(p).lines() {
        writeln!(out, "  {line}")?;
    }
    if !report.outcomes.is_empty() || !report.network_outcomes.is_empty() {
        writeln!(out, "applied:")?;
        for o in &report.network_outcomes {
            match (&o.error, &o.verification) {
                (None, Some(v)) => writeln!(out, "  ok      {} ({} ms; {})", o.action.line(), o.millis, v.detail)?,
                (None, None) => writeln!(out, "  ok      {} ({} ms)", o.action.line(), o.millis)?,
                (Some(e), _) => writeln!(out, "  FAILED  {}: {e}", o.action.line())?,
            }
        }
        for o in &report.outcomes {
            let waited = match o.waited_for.as_slice() {
                [] => String::new(),
                w => format!("; {} ms after it {}", o.waited_ms, waits_text(w).replacen("waits", "waited", 1)),
            };
            match (&o.held, &o.error) {
                (Some(w), _) => writeln!(out, "  HELD    {}: not started, {}", o.action.line(), waits_text(w))?,
                (None, None) => writeln!(out, "  ok      {} ({} ms{waited})", o.action.line(), o.millis)?,
                (None, Some(e)) => {
                    writeln!(out, "  FAILED  {}: {e}", o.action.line())?;
                    let why = diagnosis
                        .iter()
                        .find(|d| d.domain == o.action.domain)
                        .and_then(|d| diagnose::explain(d, Some(e)));
                    if let Some(f) = why {
                        writeln!(out, "          why: {}", f.line())?;
                    }
                }
            }
        }
    }
    writeln!(out, "verify (observed again):")?;
    for line in render_text(&report.remaining).lines() {
        writeln!(out, "  {line}")?;
    }
    if report.converged() {
        writeln!(out, "converged")?;
    } else {
        let held = match report.held() {
            0 => String::new(),
            n => format!(", {n} held"),
        };
        writeln!(
            out,
            "NOT converged: {} action(s) failed{held}, {} still planned",
            report.failed(),
            report.remaining.actions.len() + report.remaining.held.len()
        )?;
    }
    Ok(())
}

pub(super) fn reload_cmd(
    state_dir: &std::path::Path,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> std::io::Result<i32> {
    match crate::control::request_reload(state_dir) {
        Ok(Some(answer)) if answer.ok => {
            writeln!(out, "{}", answer.message)?;
            Ok(exit::OK)
        }
        Ok(Some(answer)) => {
            writeln!(err, "{}\nreload rejected: the service keeps the last good policy", answer.message)?;
            Ok(exit::INVALID_POLICY)
        }
        Ok(None) => {
            writeln!(err, "error: no service listens on {}", state_dir.join(crate::control::CONTROL_SOCKET).display())?;
            Ok(exit::RUNTIME)
        }
        Err(e) => {
            writeln!(err, "error: cannot ask the running service ({}): {e}", state_dir.display())?;
            Ok(exit::RUNTIME)
        }
    }
}

/// Ask the running service through its control socket (`Ok(Err(exit code))` once it answered);
/// when none listens, open the durable memory under the host lock, so no service starts
/// meanwhile, for the caller to edit.
fn ask_service_or_open_memory(
    asked: std::io::Result<Option<crate::control::Answer>>,
    who: &str,
    dirs: &Dirs,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> std::io::Result<Result<(MemoryStore, crate::lock::HostLock), i32>> {
    match asked {
        Ok(Some(answer)) if answer.ok => {
            writeln!(out, "{}", answer.message)?;
            return Ok(Err(exit::OK));
        }
        Ok(Some(answer)) => {
            writeln!(err, "error: {}", answer.message)?;
            return Ok(Err(exit::RUNTIME));
        }
        Ok(None) => {}
        Err(e) => {
            writeln!(err, "error: cannot ask the running service ({}): {e}", dirs.state_dir.display())?;
            return Ok(Err(exit::RUNTIME));
        }
    }
    let lock = match crate::lock::acquire(&dirs.lock_file, who) {
        Ok(l) => l,
        Err(e) => {
            writeln!(
                err,
                "error: {e}; it has no control socket in {} (pass its --state-dir)",
                dirs.state_dir.display()
            )?;
            return Ok(Err(exit::RUNTIME));
        }
    };
    let (store, problem) = match MemoryStore::open(&dirs.data_dir) {
        Ok(s) => s,
        Err(e) => {
            writeln!(err, "error: {e}")?;
            return Ok(Err(exit::RUNTIME));
        }
    };
    if let Some(p) = problem {
        writeln!(err, "warning: {p}")?;
    }
    Ok(Ok((store, lock)))
}

pub(super) fn release_cmd(domain: &str, dirs: &Dirs, out: &mut dyn Write, err: &mut dyn Write) -> std::io::Result<i32> {
    let asked = crate::control::request_release(&dirs.state_dir, domain);
    let (store, _lock) = match ask_service_or_open_memory(asked, "release", dirs, out, err)? {
        Ok(offline) => offline,
        Err(code) => return Ok(code),
    };
    if let Ok(held) = crate::act::uplink::release(&store, domain) {
        if !held.is_empty() {
            for h in held {
                writeln!(
                    out,
                    "released {} (held: {}); it is tried again when virtwarden runs next",
                    h.what(),
                    h.reason
                )?;
            }
            return Ok(exit::OK);
        }
    }
    let reason = store
        .update(|m| {
            let d = m.domains.get_mut(domain)?;
            d.restarts.release().map(|q| q.reason)
        })
        .0;
    match reason {
        Some(r) => {
            if let Err(e) = store.write_now() {
                writeln!(err, "error: {e}")?;
                return Ok(exit::RUNTIME);
            }
            writeln!(out, "released {domain} (was quarantined: {r}); it is restarted when virtwarden runs next")?;
        }
        None => writeln!(out, "{domain} is not quarantined")?,
    }
    Ok(exit::OK)
}

pub(super) fn memory_confirm_cmd(dirs: &Dirs, out: &mut dyn Write, err: &mut dyn Write) -> std::io::Result<i32> {
    let asked = crate::control::request_confirm_memory(&dirs.state_dir);
    let (store, _lock) = match ask_service_or_open_memory(asked, "memory confirm", dirs, out, err)? {
        Ok(offline) => offline,
        Err(code) => return Ok(code),
    };
    match store.update(|m| m.lost.take()).0 {
        Some(l) => {
            if let Err(e) = store.write_now() {
                writeln!(err, "error: {e}")?;
                return Ok(exit::RUNTIME);
            }
            writeln!(out, "confirmed: the memory lost ({}) is no longer waited for", l.describe())?;
        }
        None => writeln!(out, "the memory is not lost; nothing to confirm")?,
    }
    Ok(exit::OK)
}

pub(super) fn status_cmd(
    state_dir: &std::path::Path,
    output: Output,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> std::io::Result<i32> {
    let path = state_dir.join(crate::host::STATUS_FILE);
    let report = match crate::engine::status::read(&path) {
        Ok(r) => r,
        Err(e) => {
            writeln!(err, "error: {e}\n  hint: is `virtwarden run --state-dir {}` running?", state_dir.display())?;
            return Ok(exit::RUNTIME);
        }
    };
    match output {
        Output::Json => writeln!(out, "{}", serde_json::to_string_pretty(&report).map_err(std::io::Error::other)?)?,
        Output::Text => {
            write!(out, "{}", crate::engine::status::render_text(&report))?;
            if !std::path::Path::new(&format!("/proc/{}", report.pid)).exists() {
                writeln!(out, "note: pid {} is not running; this status is from its last run", report.pid)?;
            }
        }
    }
    Ok(exit::OK)
}

pub(super) fn diagnose_cmd(args: &DiagnoseArgs, out: &mut dyn Write, err: &mut dyn Write) -> std::io::Result<i32> {
    // Without --policies the default directory is optional when domains are named.
    let explicit = !args.policies.is_empty();
    let paths = if explicit { args.policies.clone() } else { vec![PathBuf::from(DEFAULT_POLICIES)] };
    let loaded = if !explicit && !args.domains.is_empty() && !paths[0].exists() {
        None
    } else {
        match load(&paths, warn_ownership(), err)? {
            Some(l) => Some(l),
            None => {
                if !explicit && args.domains.is_empty() {
                    writeln!(err, "  hint: name the domains to diagnose, or point --policies at the policies")?;
                }
                return Ok(exit::INVALID_POLICY);
            }
        }
    };
    let managed = |name: &str| loaded.as_ref().and_then(|l| l.desired.domain(name)).map(|m| m.policy.clone());
    let targets: Vec<Target> = if args.domains.is_empty() {
        loaded
            .iter()
            .flat_map(|l| l.desired.domains.iter())
            .map(|m| Target { domain: m.spec.name.clone(), policy: Some(m.policy.clone()) })
            .collect()
    } else {
        args.domains.iter().map(|d| Target { domain: d.clone(), policy: managed(d) }).collect()
    };
    let uri = resolve_uri(args.connect.as_deref());
    let host = match LibvirtHost::open(&uri) {
        Ok(h) => h,
        Err(e) => {
            writeln!(err, "error: {e}")?;
            return Ok(exit::RUNTIME);
        }
    };
    let mut opts = diagnose::Options::for_uri(&uri, args.network.enabled_for(&uri));
    opts.paths.qemu_conf = args.qemu_conf.clone();
    let report = match diagnose::diagnose(&host, &targets, &opts) {
        Ok(r) => r,
        Err(e) => {
            writeln!(err, "error: {e}")?;
            return Ok(exit::RUNTIME);
        }
    };
    match args.output {
        Output::Text => write!(out, "{}", diagnose::render_text(&report))?,
        Output::Json => writeln!(out, "{}", serde_json::to_string_pretty(&report).map_err(std::io::Error::other)?)?,
    }
    Ok(if report.problems() == 0 { exit::OK } else { exit::PROBLEMS })
}

pub(super) fn show_cmd(args: &ShowArgs, out: &mut dyn Write, err: &mut dyn Write) -> std::io::Result<i32> {
    let uri = resolve_uri(args.connect.as_deref());
    let host = match LibvirtHost::open(&uri) {
        Ok(h) => h,
        Err(e) => {
            writeln!(err, "error: {e}")?;
            return Ok(exit::RUNTIME);
        }
    };
    let mut observed = match host.observe_host() {
        Ok(o) => o,
        Err(e) => {
            writeln!(err, "error: {e}")?;
            return Ok(exit::RUNTIME);
        }
    };
    if args.network.enabled_for(&uri) {
        match NetCtx::open(MemoryStore::in_memory()).and_then(|n| n.observe(&Default::default())) {
            Ok(n) => observed.net = Some(n),
            Err(e) => {
                writeln!(err, "error: cannot read the host network: {e}")?;
                return Ok(exit::RUNTIME);
            }
        }
    }
    let hostname = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let shown = match crate::show::host_policy(&observed, &args.domains, &hostname) {
        Ok(s) => s,
        Err(e) => {
            writeln!(err, "error: {e}")?;
            return Ok(exit::RUNTIME);
        }
    };
    let text = match args.output {
        DocumentFormat::Yaml => {
            let header = [
                format!(
                    "{} as virtwarden show read it (libvirt {uri}) on {}",
                    hostname.trim(),
                    chrono::Utc::now().format("%Y-%m-%d %H:%M UTC")
                ),
                "`virtwarden plan` on this file finds nothing to do; edit it (restart: always, drop what".into(),
                "should stay unmanaged), check it, then install it in /etc/virtwarden/policies/.".into(),
            ];
            crate::show::to_yaml(&shown, &header)
        }
        DocumentFormat::Json => crate::show::to_json(&shown).map(|j| j + "\n"),
    };
    match text {
        Ok(t) => write!(out, "{t}")?,
        Err(e) => {
            writeln!(err, "error: {e}")?;
            return Ok(exit::RUNTIME);
        }
    }
    Ok(exit::OK)
}
