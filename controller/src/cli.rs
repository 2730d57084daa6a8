//! The one-shot command line: `check`, `plan`, `apply`, `schema`. Exit codes are part of the
//! interface (documented in `--help` and the README).

use std::io::Write;
use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};
use virtwarden_policies::{load_paths, LoadError, LoadedPolicies};

use crate::act::{apply_plan, ApplyReport};
use crate::hypervisor::Hypervisor;
use crate::libvirt::{resolve_uri, LibvirtHost};
use crate::plan::{plan, render_text, Plan};

/// Process exit codes.
pub mod exit {
    pub const OK: i32 = 0;
    pub const RUNTIME: i32 = 1;
    pub const INVALID_POLICY: i32 = 2;
    pub const DRIFT: i32 = 3;
}

const EXIT_CODES: &str = "\
Exit codes:
  check   0 valid, 2 invalid policy
  plan    0 in sync, 3 drift found, 2 invalid policy, 1 runtime error (e.g. cannot connect)
  apply   0 converged, 1 some action failed or did not stick, 2 invalid policy";

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

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Validate policy files and directories; print every problem with file:line:column.
    Check {
        #[arg(required = true, value_name = "PATH")]
        paths: Vec<PathBuf>,
    },
    /// Show what apply would change, without changing anything.
    Plan {
        /// libvirt URI (default: $LIBVIRT_DEFAULT_URI, then qemu:///system).
        #[arg(long, short = 'c')]
        connect: Option<String>,
        #[arg(long, short = 'o', value_enum, default_value_t = Output::Text)]
        output: Output,
        #[arg(required = true, value_name = "PATH")]
        paths: Vec<PathBuf>,
    },
    /// Change the host to match the policies, then re-read it and verify.
    Apply {
        /// libvirt URI (default: $LIBVIRT_DEFAULT_URI, then qemu:///system).
        #[arg(long, short = 'c')]
        connect: Option<String>,
        #[arg(long, short = 'o', value_enum, default_value_t = Output::Text)]
        output: Output,
        #[arg(required = true, value_name = "PATH")]
        paths: Vec<PathBuf>,
    },
    /// Print the JSON Schema of a HostPolicy document (for editors' YAML language servers).
    Schema,
}

/// Run a one-shot command, writing results to `out` and problems to `err`. Returns the exit code.
pub fn run(command: Command, out: &mut dyn Write, err: &mut dyn Write) -> i32 {
    let result = match command {
        Command::Check { paths } => check(&paths, out, err),
        Command::Plan {
            connect,
            output,
            paths,
        } => with_host(&paths, connect.as_deref(), err, |loaded, hv| {
            plan_cmd(loaded, hv, output, out)
        }),
        Command::Apply {
            connect,
            output,
            paths,
        } => with_host(&paths, connect.as_deref(), err, |loaded, hv| {
            apply_cmd(loaded, hv, output, out)
        }),
        Command::Schema => write!(
            out,
            "{}",
            virtwarden_policies::schema::host_policy_schema_json()
        )
        .map(|_| exit::OK),
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
        .filter_map(|(k, v)| {
            v.as_ref()
                .map(|s| format!("{k}={}", if s.enabled { "on" } else { "off" }))
        })
        .collect();
    writeln!(
        out,
        "ok: {} file(s), {} polic{}: {} domain(s), {} bridge(s), forwarding {}",
        loaded.files.len(),
        d.policies.len(),
        if d.policies.len() == 1 { "y" } else { "ies" },
        d.domains.len(),
        d.bridges.len(),
        if fwd.is_empty() {
            "unmanaged".to_string()
        } else {
            fwd.join(" ")
        }
    )?;
    Ok(exit::OK)
}

fn with_host(
    paths: &[PathBuf],
    connect: Option<&str>,
    err: &mut dyn Write,
    body: impl FnOnce(&LoadedPolicies, &dyn Hypervisor) -> std::io::Result<i32>,
) -> std::io::Result<i32> {
    let Some(loaded) = load(paths, err)? else {
        return Ok(exit::INVALID_POLICY);
    };
    let uri = resolve_uri(connect);
    let host = match LibvirtHost::open(&uri) {
        Ok(h) => h,
        Err(e) => {
            writeln!(err, "error: {e}")?;
            return Ok(exit::RUNTIME);
        }
    };
    match body(&loaded, &host) {
        Ok(code) => Ok(code),
        Err(e) => {
            writeln!(err, "error: {e}")?;
            Ok(exit::RUNTIME)
        }
    }
}

fn observe_and_plan(loaded: &LoadedPolicies, hv: &dyn Hypervisor) -> std::io::Result<Plan> {
    let observed = hv.observe_host().map_err(std::io::Error::other)?;
    Ok(plan(&loaded.desired, &observed))
}

fn plan_cmd(
    loaded: &LoadedPolicies,
    hv: &dyn Hypervisor,
    output: Output,
    out: &mut dyn Write,
) -> std::io::Result<i32> {
    let p = observe_and_plan(loaded, hv)?;
    match output {
        Output::Text => write!(out, "{}", render_text(&p))?,
        Output::Json => writeln!(
            out,
            "{}",
            serde_json::to_string_pretty(&p).map_err(std::io::Error::other)?
        )?,
    }
    Ok(if p.is_empty() { exit::OK } else { exit::DRIFT })
}

fn apply_cmd(
    loaded: &LoadedPolicies,
    hv: &dyn Hypervisor,
    output: Output,
    out: &mut dyn Write,
) -> std::io::Result<i32> {
    let p = observe_and_plan(loaded, hv)?;
    let report = apply_plan(hv, &loaded.desired, &p).map_err(std::io::Error::other)?;
    match output {
        Output::Text => write_apply_text(&p, &report, out)?,
        Output::Json => writeln!(
            out,
            "{}",
            serde_json::to_string_pretty(&report).map_err(std::io::Error::other)?
        )?,
    }
    Ok(if report.converged() {
        exit::OK
    } else {
        exit::RUNTIME
    })
}

fn write_apply_text(p: &Plan, report: &ApplyReport, out: &mut dyn Write) -> std::io::Result<()> {
    writeln!(out, "plan:")?;
    for line in render_text(p).lines() {
        writeln!(out, "  {line}")?;
    }
    if !report.outcomes.is_empty() {
        writeln!(out, "applied:")?;
        for o in &report.outcomes {
            match &o.error {
                None => writeln!(out, "  ok      {} ({} ms)", o.action.line(), o.millis)?,
                Some(e) => writeln!(out, "  FAILED  {}: {e}", o.action.line())?,
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
        writeln!(
            out,
            "NOT converged: {} action(s) failed, {} still planned",
            report.failed(),
            report.remaining.actions.len()
        )?;
    }
    Ok(())
}
