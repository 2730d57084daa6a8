//! The long-running commands, `run` and `operator`: the checks they share on their one set of
//! flags (`ServiceArgs`), then their front end (`host`, `operator`) on a multi-thread runtime.

use std::io::Write;
use std::path::PathBuf;

use super::args::ServiceArgs;
use crate::exit;
use crate::libvirt::resolve_uri;

/// What `run` and `operator` check the same way before they start: the metrics address and a
/// resync period that is not zero. `Err` carries the exit code.
fn service_settings(
    s: &ServiceArgs,
    err: &mut dyn Write,
) -> std::io::Result<Result<(Option<std::net::SocketAddr>, std::time::Duration), i32>> {
    let metrics_addr = match parse_metrics_addr(&s.metrics_addr, err)? {
        Ok(a) => a,
        Err(code) => return Ok(Err(code)),
    };
    if s.resync.as_std().is_zero() {
        writeln!(err, "error: --resync must be longer than 0s")?;
        return Ok(Err(exit::INVALID_POLICY));
    }
    Ok(Ok((metrics_addr, s.resync.as_std())))
}

/// `run`: the host service on the policy files in `paths`.
pub(super) fn run(s: ServiceArgs, paths: Vec<PathBuf>, err: &mut dyn Write) -> std::io::Result<i32> {
    let (metrics_addr, resync) = match service_settings(&s, err)? {
        Ok(v) => v,
        Err(code) => return Ok(code),
    };
    let uri = resolve_uri(s.connect.as_deref());
    let opts = crate::host::RunOptions {
        network: s.network.enabled_for(&uri),
        uri,
        resync,
        metrics_addr,
        state_dir: s.state_dir,
        data_dir: s.data_dir,
        lock_file: s.lock_file,
        max_concurrent_starts: s.max_concurrent_starts,
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

/// `operator`: the Kubernetes front end on this node; `exec` steps only from `allow_exec_dir`.
pub(super) fn operator(
    s: ServiceArgs,
    node: String,
    allow_exec_dir: Option<PathBuf>,
    err: &mut dyn Write,
) -> std::io::Result<i32> {
    let exec = match allow_exec_dir {
        Some(dir) => crate::act::hook::ExecPolicy::InsideDir(dir),
        None => crate::act::hook::ExecPolicy::Disabled,
    };
    let (metrics_addr, resync) = match service_settings(&s, err)? {
        Ok(v) => v,
        Err(code) => return Ok(code),
    };
    if let crate::act::hook::ExecPolicy::InsideDir(dir) = &exec {
        if !dir.is_absolute() {
            writeln!(err, "error: --allow-exec-dir {}: write an absolute path", dir.display())?;
            return Ok(exit::INVALID_POLICY);
        }
    }
    let uri = resolve_uri(s.connect.as_deref());
    let opts = crate::operator::OperatorOptions {
        exec,
        network: s.network.enabled_for(&uri),
        uri,
        node,
        resync,
        metrics_addr,
        state_dir: s.state_dir,
        data_dir: s.data_dir,
        lock_file: s.lock_file,
        max_concurrent_starts: s.max_concurrent_starts,
    };
    Ok(runtime()?.block_on(crate::operator::run(opts)))
}
