//! The command line: one-shot `check`, `plan`, `apply`, `show`, `diagnose`, `status`, `release`,
//! `memory confirm`, `reload`, `schema`, and the long-running `run` and `operator`. Exit codes are
//! part of the interface (documented in `--help` and docs/cli.md). `args` is the clap schema,
//! `oneshot` the one-shot commands, `service` the start of `run` and `operator`; this file only
//! dispatches.

use std::io::Write;

mod args;
mod oneshot;
mod service;

pub use args::{
    Cli, Command, DiagnoseArgs, DiagnoseMode, Dirs, DocumentFormat, HostArgs, LogFormat, MemoryAction, NetworkMode,
    Output, ServiceArgs, ShowArgs, DEFAULT_DATA_DIR, DEFAULT_POLICIES,
};
pub use oneshot::{enforce_ownership, warn_ownership};

use crate::exit;

/// Run a command, writing results to `out` and problems to `err`. Returns the exit code.
pub fn run(command: Command, out: &mut dyn Write, err: &mut dyn Write) -> i32 {
    let result = match command {
        Command::Check { paths } => oneshot::check(&paths, out, err),
        Command::Plan(a) => oneshot::plan(&a, out, err),
        Command::Apply { host, parallel } => oneshot::apply(&host, parallel, out, err),
        Command::Schema => oneshot::schema(out),
        Command::Run { service, paths } => service::run(service, paths, err),
        Command::Status { state_dir, output } => oneshot::status_cmd(&state_dir, output, out, err),
        Command::Operator { node_name, service, allow_exec_dir } => {
            service::operator(service, node_name, allow_exec_dir, err)
        }
        Command::Release { domain, dirs } => oneshot::release_cmd(&domain, &dirs, out, err),
        Command::Memory { action: MemoryAction::Confirm { dirs } } => oneshot::memory_confirm_cmd(&dirs, out, err),
        Command::Diagnose(a) => oneshot::diagnose_cmd(&a, out, err),
        Command::Reload { state_dir } => oneshot::reload_cmd(&state_dir, out, err),
        Command::GenerateAssets { dir } => crate::assets::generate(&dir).map(|()| exit::OK),
        Command::Show(a) => oneshot::show_cmd(&a, out, err),
    };
    result.unwrap_or(exit::RUNTIME)
}
