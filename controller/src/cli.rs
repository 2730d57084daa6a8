//! The one-shot command line: `check`, `plan`, `apply`, `schema`. Exit codes are part of the
//! interface (documented in `--help` and the README).

use std::io::Write;
use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};
use virtwarden_policies::{load_paths, LoadError, LoadedPolicies};

use crate::act::network::{apply_net_actions, observe_net};
use crate::act::{apply_plan_with, ApplyOptions, ApplyReport};
use crate::exit;
use crate::hostnet::netlink::NetlinkHost;
use crate::hostnet::sysctl::ProcForwarding;
use crate::hypervisor::Hypervisor;
use crate::libvirt::pool::{connections_for, LibvirtPool};
use crate::libvirt::resolve_uri;
use crate::observe::paths::missing_paths;
use crate::observe::{ObservedHost, ObservedNet};
use crate::plan::startup::waits_text;
use crate::plan::{plan_ordered, render_text, Plan};

const EXIT_CODES: &str = "\
Exit codes:
  check   0 valid, 2 invalid policy
  plan    0 in sync, 3 drift found, 2 invalid policy, 1 runtime error (e.g. cannot connect)
  apply   0 converged, 1 some action failed or did not stick, 2 invalid policy
  run     0 stopped by SIGTERM/SIGINT, 1 runtime error (e.g. another instance runs), 2 invalid policy
  status  0 shown, 1 no status file";

#[derive(Debug, Parser)]
#[command(name = "virtwarden", version, about = "Self-healing reconciliation for libvirt/KVM hosts", after_help = EXIT_CODES)]
pub struct Cli {
    /// Log format on stderr.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    Text,
    Json,
}

/// Whether `plan`/`apply`/`run` look at the host network.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum NetworkMode {
    /// On, except for libvirt's test driver (whose domains are not real, so the host's network
    /// must not be changed for them).
    Auto,
    On,
    Off,
}

impl NetworkMode {
    pub fn enabled_for(self, uri: &str) -> bool {
        match self {
            NetworkMode::Auto => !uri.starts_with("test:"),
            NetworkMode::On => true,
            NetworkMode::Off => false,
        }
    }
}

/// What `plan` and `apply` take.
#[derive(Debug, clap::Args)]
pub struct HostArgs {
    /// libvirt URI (default: $LIBVIRT_DEFAULT_URI, then qemu:///system).
    #[arg(long, short = 'c')]
    pub connect: Option<String>,
    #[arg(long, short = 'o', value_enum, default_value_t = Output::Text)]
    pub output: Output,
    /// Host network (bridges, taps, forwarding): auto = on unless the URI is libvirt's test driver.
    #[arg(long, value_enum, default_value_t = NetworkMode::Auto)]
    pub network: NetworkMode,
    #[arg(required = true, value_name = "PATH")]
    pub paths: Vec<PathBuf>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Validate policy files and directories; print every problem with file:line:column.
    Check {
        #[arg(required = true, value_name = "PATH")]
        paths: Vec<PathBuf>,
    },
    /// Show what apply would change, without changing anything.
    Plan(HostArgs),
    /// Change the host to match the policies, then re-read it and verify.
    Apply {
        #[command(flatten)]
        host: HostArgs,
        /// At most this many domains are acted on at once (each domain's own actions run in order).
        #[arg(long, default_value_t = crate::act::DEFAULT_PARALLEL, value_parser = parse_parallel)]
        parallel: usize,
    },
    /// Run as a host service: react to libvirt events and policy changes, resync periodically.
    Run {
        /// libvirt URI (default: $LIBVIRT_DEFAULT_URI, then qemu:///system).
        #[arg(long, short = 'c')]
        connect: Option<String>,
        /// Full resync period (safety net for missed events).
        #[arg(long, default_value = "60s")]
        resync: virtwarden_policies::Duration,
        /// Where to serve /metrics, /healthz and /readyz; `off` disables it.
        #[arg(long, default_value = "127.0.0.1:9477")]
        metrics_addr: String,
        /// Lock file and status file directory.
        #[arg(long, default_value = "/run/virtwarden")]
        state_dir: PathBuf,
        /// Host network (bridges, taps, forwarding): auto = on unless the URI is libvirt's test driver.
        #[arg(long, value_enum, default_value_t = NetworkMode::Auto)]
        network: NetworkMode,
        #[arg(required = true, value_name = "PATH")]
        paths: Vec<PathBuf>,
    },
    /// Run as a Kubernetes operator on this node (DaemonSet): HostPolicy resources instead of files.
    Operator {
        /// libvirt URI (default: $LIBVIRT_DEFAULT_URI, then qemu:///system).
        #[arg(long, short = 'c')]
        connect: Option<String>,
        /// This node's name (the DaemonSet passes it from the downward API).
        #[arg(long, env = "NODE_NAME")]
        node_name: String,
        /// Full resync period.
        #[arg(long, default_value = "60s")]
        resync: virtwarden_policies::Duration,
        /// Where to serve /metrics, /healthz and /readyz; `off` disables it.
        #[arg(long, default_value = "127.0.0.1:9477")]
        metrics_addr: String,
        /// Host network (bridges, taps, forwarding): auto = on unless the URI is libvirt's test driver.
        #[arg(long, value_enum, default_value_t = NetworkMode::Auto)]
        network: NetworkMode,
    },
    /// Show what a running `virtwarden run` reports (from its status file).
    Status {
        #[arg(long, default_value = "/run/virtwarden")]
        state_dir: PathBuf,
        #[arg(long, short = 'o', value_enum, default_value_t = Output::Text)]
        output: Output,
    },
    /// Print the JSON Schema of a HostPolicy document (for editors' YAML language servers).
    Schema,
}

fn parse_parallel(text: &str) -> Result<usize, String> {
    match text.parse::<usize>() {
        Ok(n) if (1..=1024).contains(&n) => Ok(n),
        _ => Err(format!("`{text}` is not a number from 1 to 1024")),
    }
}

/// Run a one-shot command, writing results to `out` and problems to `err`. Returns the exit code.
pub fn run(command: Command, out: &mut dyn Write, err: &mut dyn Write) -> i32 {
    let result = match command {
        Command::Check { paths } => check(&paths, out, err),
        Command::Plan(a) => with_host(&a, 1, err, |ctx| plan_cmd(ctx, a.output, out)),
        Command::Apply { host: a, parallel } => {
            with_host(&a, parallel, err, |ctx| apply_cmd(ctx, a.output, &ApplyOptions { parallel }, out))
        }
        Command::Schema => write!(out, "{}", virtwarden_policies::schema::host_policy_schema_json()).map(|_| exit::OK),
        Command::Run { connect, resync, metrics_addr, state_dir, network, paths } => {
            run_service(connect, resync, &metrics_addr, state_dir, network, paths, err)
        }
        Command::Status { state_dir, output } => status_cmd(&state_dir, output, out, err),
        Command::Operator { connect, node_name, resync, metrics_addr, network } => {
            operator_cmd(connect, node_name, resync, &metrics_addr, network, err)
        }
    };
    result.unwrap_or(exit::RUNTIME)
}

/// Load policies; on failure report them on `err` (a failed write must not change the exit
/// code, so it is ignored) and return `None`.
fn load(paths: &[PathBuf], err: &mut dyn Write) -> std::io::Result<Option<LoadedPolicies>> {
    match load_paths(paths) {
        Ok(l) => Ok(Some(l)),
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

fn check(paths: &[PathBuf], out: &mut dyn Write, err: &mut dyn Write) -> std::io::Result<i32> {
    let Some(loaded) = load(paths, err)? else {
        return Ok(exit::INVALID_POLICY);
    };
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

/// The network half of a one-shot run: a netlink connection on a small runtime.
struct NetCtx {
    rt: tokio::runtime::Runtime,
    net: NetlinkHost,
    fwd: ProcForwarding,
}

impl NetCtx {
    fn open() -> std::io::Result<Self> {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        let net = rt.block_on(async { NetlinkHost::connect() }).map_err(std::io::Error::other)?;
        Ok(NetCtx { rt, net, fwd: ProcForwarding::default() })
    }

    fn observe(&self) -> std::io::Result<ObservedNet> {
        self.rt.block_on(observe_net(&self.net, &self.fwd)).map_err(std::io::Error::other)
    }
}

/// Everything a one-shot command works with.
struct Ctx<'a> {
    loaded: &'a LoadedPolicies,
    hv: &'a dyn Hypervisor,
    net: Option<NetCtx>,
}

impl Ctx<'_> {
    fn observe(&self) -> std::io::Result<ObservedHost> {
        let mut host = self.hv.observe_host().map_err(std::io::Error::other)?;
        if let Some(net) = &self.net {
            host.net = Some(net.observe()?);
        }
        Ok(host)
    }

    fn plan(&self) -> std::io::Result<Plan> {
        let desired = &self.loaded.desired;
        Ok(plan_ordered(desired, &self.observe()?, &missing_paths(desired)))
    }
}

/// Open what a one-shot command works with; `parallel` calls may be in flight at once (apply),
/// so the libvirt side is a pool of connections sized for them.
fn with_host(
    args: &HostArgs,
    parallel: usize,
    err: &mut dyn Write,
    body: impl FnOnce(&Ctx) -> std::io::Result<i32>,
) -> std::io::Result<i32> {
    let Some(loaded) = load(&args.paths, err)? else {
        return Ok(exit::INVALID_POLICY);
    };
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
        match NetCtx::open() {
            Ok(n) => Some(n),
            Err(e) => {
                writeln!(err, "error: cannot open netlink: {e}")?;
                return Ok(exit::RUNTIME);
            }
        }
    } else {
        None
    };
    let ctx = Ctx { loaded: &loaded, hv: &host, net };
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
    match output {
        Output::Text => write!(out, "{}", render_text(&p))?,
        Output::Json => writeln!(out, "{}", serde_json::to_string_pretty(&p).map_err(std::io::Error::other)?)?,
    }
    Ok(if p.is_empty() { exit::OK } else { exit::DRIFT })
}

/// Network changes that did not stick are tried again this many times, with backoff.
const NET_RETRIES: u32 = 3;

fn apply_cmd(ctx: &Ctx, output: Output, opts: &ApplyOptions, out: &mut dyn Write) -> std::io::Result<i32> {
    let p = ctx.plan()?;
    let mut network_outcomes = Vec::new();
    if let Some(net) = &ctx.net {
        network_outcomes = net.rt.block_on(apply_net_actions(&net.net, &net.fwd, &p.network));
    }
    let mut report = apply_plan_with(ctx.hv, &ctx.loaded.desired, &p, opts).map_err(std::io::Error::other)?;
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
            network_outcomes.extend(net.rt.block_on(apply_net_actions(&net.net, &net.fwd, &again.network)));
        }
        report.remaining = ctx.plan()?;
    }
    report.network_outcomes = network_outcomes;
    match output {
        Output::Text => write_apply_text(&p, &report, out)?,
        Output::Json => writeln!(out, "{}", serde_json::to_string_pretty(&report).map_err(std::io::Error::other)?)?,
    }
    Ok(if report.converged() { exit::OK } else { exit::RUNTIME })
}

fn write_apply_text(p: &Plan, report: &ApplyReport, out: &mut dyn Write) -> std::io::Result<()> {
    writeln!(out, "plan:")?;
    for line in render_text(p).lines() {
        writeln!(out, "  {line}")?;
    }
    if !report.outcomes.is_empty() || !report.network_outcomes.is_empty() {
        writeln!(out, "applied:")?;
        for o in &report.network_outcomes {
            match &o.error {
                None => writeln!(out, "  ok      {} ({} ms)", o.action.line(), o.millis)?,
                Some(e) => writeln!(out, "  FAILED  {}: {e}", o.action.line())?,
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
                (None, Some(e)) => writeln!(out, "  FAILED  {}: {e}", o.action.line())?,
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

fn run_service(
    connect: Option<String>,
    resync: virtwarden_policies::Duration,
    metrics_addr: &str,
    state_dir: PathBuf,
    network: NetworkMode,
    paths: Vec<PathBuf>,
    err: &mut dyn Write,
) -> std::io::Result<i32> {
    let metrics_addr = match parse_metrics_addr(metrics_addr, err)? {
        Ok(a) => a,
        Err(code) => return Ok(code),
    };
    if resync.as_std().is_zero() {
        writeln!(err, "error: --resync must be longer than 0s")?;
        return Ok(exit::INVALID_POLICY);
    }
    let uri = resolve_uri(connect.as_deref());
    let opts = crate::host::RunOptions {
        network: network.enabled_for(&uri),
        uri,
        resync: resync.as_std(),
        metrics_addr,
        state_dir,
        paths,
    };
    Ok(runtime()?.block_on(crate::host::run(opts)))
}

fn parse_metrics_addr(text: &str, err: &mut dyn Write) -> std::io::Result<Result<Option<std::net::SocketAddr>, i32>> {
    Ok(match text {
        "off" | "" => Ok(None),
        t => match t.parse() {
            Ok(a) => Ok(Some(a)),
            Err(e) => {
                writeln!(err, "error: --metrics-addr {t}: {e} (use HOST:PORT or `off`)")?;
                Err(exit::INVALID_POLICY)
            }
        },
    })
}

fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .max_blocking_threads(16)
        .thread_name("virtwarden")
        .enable_all()
        .build()
}

fn operator_cmd(
    connect: Option<String>,
    node: String,
    resync: virtwarden_policies::Duration,
    metrics_addr: &str,
    network: NetworkMode,
    err: &mut dyn Write,
) -> std::io::Result<i32> {
    let metrics_addr = match parse_metrics_addr(metrics_addr, err)? {
        Ok(a) => a,
        Err(code) => return Ok(code),
    };
    let uri = resolve_uri(connect.as_deref());
    let opts = crate::operator::OperatorOptions {
        network: network.enabled_for(&uri),
        uri,
        node,
        resync: resync.as_std().max(std::time::Duration::from_secs(1)),
        metrics_addr,
    };
    Ok(runtime()?.block_on(crate::operator::run(opts)))
}

fn status_cmd(
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
