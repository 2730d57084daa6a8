//! The host service (`virtwarden run`): policy files and SIGHUP feed the engine, systemd gets
//! READY/STATUS/WATCHDOG, metrics are served on loopback, one instance per host.

pub mod reload;
pub mod watch;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use sd_notify::NotifyState;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::{mpsc, watch as watch_channel};

use crate::act::remediation::Registry;
use crate::engine::{EngineConfig, EngineHandle};
use crate::exit;
use reload::{LastReload, Reloader, Trigger};

/// Options of `virtwarden run`.
#[derive(Debug, Clone)]
pub struct RunOptions {
    pub uri: String,
    pub resync: Duration,
    pub metrics_addr: Option<SocketAddr>,
    pub state_dir: PathBuf,
    /// Where the durable memory lives.
    pub data_dir: PathBuf,
    /// The host-wide lock file.
    pub lock_file: PathBuf,
    pub paths: Vec<PathBuf>,
    /// Reconcile the host network too.
    pub network: bool,
    /// At most this many starts at once (`--max-concurrent-starts`).
    pub max_concurrent_starts: usize,
}

/// Name of the status file inside the state directory.
pub const STATUS_FILE: &str = "status.json";

/// Run until SIGTERM/SIGINT. Returns the process exit code.
pub async fn run(opts: RunOptions) -> i32 {
    let _lock = match crate::service::prepare(&opts.lock_file, "run", &opts.state_dir) {
        Ok(l) => l,
        Err(code) => return code,
    };
    let mut reloader = Reloader::new(opts.paths.clone());
    let desired = match reloader.load_at_start().await {
        Ok(d) => d,
        Err(text) => {
            // The whole located report for the operator, and one record at error priority so
            // `journalctl -p err` shows why the service did not start.
            eprintln!("{text}");
            let first = text.lines().next().unwrap_or_default();
            tracing::error!(error = %first, "invalid or untrusted policy at start; not starting (exit 2, systemd does not retry)");
            return exit::INVALID_POLICY;
        }
    };
    if desired.policies.is_empty() {
        tracing::info!(paths = ?opts.paths, "no policy loaded: nothing is managed until a policy file is added");
    }
    let config = EngineConfig {
        resync: opts.resync,
        status_path: Some(opts.state_dir.join(STATUS_FILE)),
        data_dir: Some(opts.data_dir.clone()),
        network: opts.network,
        max_concurrent_starts: opts.max_concurrent_starts,
        ..Default::default()
    };
    let (control_tx, mut control_rx) = mpsc::unbounded_channel::<crate::control::ReloadReply>();
    let start = crate::service::Start {
        who: "run",
        uri: &opts.uri,
        network: opts.network,
        config,
        remediations: Registry::with_builtins(),
        desired,
        metrics_addr: opts.metrics_addr,
        state_dir: &opts.state_dir,
        reloads: Some(control_tx),
    };
    let crate::service::Running { engine, task: mut engine_task } =
        match crate::service::start(start, EngineHandle::clone).await {
            Ok(r) => r,
            Err(code) => return code,
        };

    let (reload_tx, mut reload_rx) = mpsc::unbounded_channel::<()>();
    let _watcher = match watch::watch(&opts.paths, reload_tx) {
        Ok(w) => Some(w),
        Err(e) => {
            tracing::warn!(%e, "cannot watch policy files; use SIGHUP to reload");
            None
        }
    };
    let (mut hup, mut term, mut int) =
        match (signal(SignalKind::hangup()), signal(SignalKind::terminate()), signal(SignalKind::interrupt())) {
            (Ok(h), Ok(t), Ok(i)) => (h, t, i),
            _ => {
                eprintln!("error: cannot install signal handlers");
                engine.shutdown();
                let _ = engine_task.await;
                return exit::RUNTIME;
            }
        };
    tokio::spawn(systemd_notifier(engine.clone(), reloader.subscribe()));
    tracing::info!(uri = %opts.uri, state_dir = %opts.state_dir.display(), "virtwarden running");

    loop {
        tokio::select! {
            _ = hup.recv() => {
                tracing::info!("SIGHUP: reloading policies and resyncing");
                let _ = reloader.reload(&engine, Trigger::Signal).await;
            }
            Some(reply) = control_rx.recv() => {
                tracing::info!("reload requested: reloading policies and resyncing");
                let verdict = reloader.reload(&engine, Trigger::Request).await;
                let _ = reply.send(verdict);
            }
            Some(()) = reload_rx.recv() => {
                let _ = reloader.reload(&engine, Trigger::Watch).await;
            }
            _ = term.recv() => break,
            _ = int.recv() => break,
            _ = &mut engine_task => {
                tracing::error!("engine stopped unexpectedly");
                return exit::RUNTIME;
            }
        }
    }
    tracing::info!("stopping");
    let _ = sd_notify::notify(&[NotifyState::Stopping]);
    engine.shutdown();
    let _ = engine_task.await;
    exit::OK
}

/// READY once connected and resynced, STATUS on changes (at most once a second), WATCHDOG
/// only while the engine makes progress (its loop answers and resync rounds complete), so
/// systemd restarts a stuck service. Nothing here polls when systemd asked for no watchdog.
async fn systemd_notifier(engine: EngineHandle, mut reloads: watch_channel::Receiver<LastReload>) {
    let mut changes = engine.subscribe();
    let mut watchdog = sd_notify::watchdog_enabled().map(|w| tokio::time::interval(w / 2));
    let mut ready = false;
    let mut last = String::new();
    loop {
        if !ready && engine.is_ready() {
            ready = true;
            let _ = sd_notify::notify(&[NotifyState::Ready]);
        }
        let text = status_text(&engine.status(), &reloads.borrow());
        if text != last {
            let _ = sd_notify::notify(&[NotifyState::Status(&text)]);
            last = text;
        }
        tokio::select! {
            _ = tick(watchdog.as_mut()) => {
                match engine.liveness().await {
                    Ok(()) => {
                        let _ = sd_notify::notify(&[NotifyState::Watchdog]);
                    }
                    Err(why) => tracing::error!(%why, "engine makes no progress; withholding the systemd watchdog ping"),
                }
            }
            changed = changes.changed() => {
                if changed.is_err() {
                    return;
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            changed = reloads.changed() => {
                if changed.is_err() {
                    return;
                }
            }
        }
    }
}

/// systemd's STATUS= line: the policies in force (or that none is), the domains, and the last
/// reload's verdict (`systemctl status` shows it).
pub fn status_text(status: &crate::engine::status::StatusReport, last: &LastReload) -> String {
    let policies = if status.policies.is_empty() {
        "no policy loaded (nothing managed)".to_string()
    } else {
        format!("policies: {}", status.policies.join(", "))
    };
    let down = status.domains.iter().filter(|d| !d.state.starts_with("running")).count();
    let quarantined = status.domains.iter().filter(|d| d.quarantined.is_some()).count();
    format!(
        "{policies}; {} domains managed, {down} not running, {quarantined} quarantined{}{}",
        status.domains.len(),
        if status.connected { "" } else { "; libvirt DISCONNECTED" },
        last.describe().map(|r| format!("; {r}")).unwrap_or_default()
    )
}

async fn tick(interval: Option<&mut tokio::time::Interval>) {
    match interval {
        Some(i) => {
            i.tick().await;
        }
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::status::StatusReport;

    #[test]
    fn status_says_when_no_policy_is_loaded_and_how_the_last_reload_went() {
        let empty = StatusReport { connected: true, ..Default::default() };
        let text = status_text(&empty, &LastReload::default());
        assert!(text.starts_with("no policy loaded"), "{text}");
        assert!(!text.contains("reload"), "{text}");

        let loaded = StatusReport { connected: true, policies: vec!["web".into(), "db".into()], ..Default::default() };
        let ok = LastReload { at: Some(chrono::Local::now()), result: Some(Ok(())) };
        let text = status_text(&loaded, &ok);
        assert!(text.starts_with("policies: web, db;") && text.contains("last reload OK at "), "{text}");

        let rejected = LastReload { at: Some(chrono::Local::now()), result: Some(Err("a.yaml:3:7: bad".into())) };
        let text = status_text(&loaded, &rejected);
        assert!(
            text.contains("reload FAILED at ")
                && text.contains("a.yaml:3:7")
                && text.contains("last good policy in force"),
            "{text}"
        );
    }
}
