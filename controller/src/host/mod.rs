//! The host service (`virtwarden run`): policy files and SIGHUP feed the engine, systemd gets
//! READY/STATUS/WATCHDOG, metrics are served on loopback, one instance per host.

pub mod control;
pub mod watch;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use sd_notify::NotifyState;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::mpsc;
use virtwarden_policies::{load_paths_with, TrustMode, TrustedOwners};

use crate::act::remediation::Registry;
use crate::engine::{EngineConfig, EngineHandle};
use crate::exit;

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
    let desired = match load_blocking(opts.paths.clone()).await {
        Ok(d) => d,
        Err(text) => {
            eprintln!("{text}");
            return exit::INVALID_POLICY;
        }
    };
    let config = EngineConfig {
        resync: opts.resync,
        status_path: Some(opts.state_dir.join(STATUS_FILE)),
        data_dir: Some(opts.data_dir.clone()),
        network: opts.network,
        max_concurrent_starts: opts.max_concurrent_starts,
        ..Default::default()
    };
    let start = crate::service::Start {
        who: "run",
        uri: &opts.uri,
        network: opts.network,
        config,
        remediations: Registry::with_builtins(),
        desired,
        metrics_addr: opts.metrics_addr,
        state_dir: &opts.state_dir,
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
    tokio::spawn(systemd_notifier(engine.clone()));
    tracing::info!(uri = %opts.uri, state_dir = %opts.state_dir.display(), "virtwarden running");

    loop {
        tokio::select! {
            _ = hup.recv() => {
                tracing::info!("SIGHUP: reloading policies and resyncing");
                let _ = sd_notify::notify(&[NotifyState::Reloading]);
                reload(&engine, &opts.paths).await;
                let _ = sd_notify::notify(&[NotifyState::Ready]);
            }
            Some(()) = reload_rx.recv() => {
                tracing::info!("policy files changed: reloading");
                reload(&engine, &opts.paths).await;
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

async fn load_blocking(paths: Vec<PathBuf>) -> Result<virtwarden_policies::DesiredState, String> {
    // Policy files are checked like sshd's StrictModes on every load: at start a violation exits 2,
    // on a reload the last good policy stays.
    match tokio::task::spawn_blocking(move || {
        load_paths_with(&paths, TrustMode::Enforce(TrustedOwners::of_this_process()))
    })
    .await
    {
        Ok(Ok(loaded)) => Ok(loaded.desired),
        Ok(Err(e)) => Err(e.to_string()),
        Err(e) => Err(format!("policy loading failed: {e}")),
    }
}

/// Load the policies again; on any error keep the last good ones in force and say why.
async fn reload(engine: &EngineHandle, paths: &[PathBuf]) {
    match load_blocking(paths.to_vec()).await {
        Ok(desired) => {
            tracing::info!(policies = ?desired.policies, domains = desired.domains.len(), "policies reloaded");
            engine.reload(desired);
        }
        Err(text) => {
            for line in text.lines().filter(|l| !l.starts_with(' ')) {
                tracing::error!(error = %line, "policy reload rejected; the last good policy stays in force");
            }
            engine.policy_rejected(text);
            engine.resync();
        }
    }
}

/// READY once connected and resynced, STATUS on changes (at most once a second), WATCHDOG
/// only while the engine makes progress (its loop answers and resync rounds complete), so
/// systemd restarts a stuck service. Nothing here polls when systemd asked for no watchdog.
async fn systemd_notifier(engine: EngineHandle) {
    let mut changes = engine.subscribe();
    let mut watchdog = sd_notify::watchdog_enabled().map(|w| tokio::time::interval(w / 2));
    let mut ready = false;
    let mut last = String::new();
    loop {
        if !ready && engine.is_ready() {
            ready = true;
            let _ = sd_notify::notify(&[NotifyState::Ready]);
        }
        let status = engine.status();
        let down = status.domains.iter().filter(|d| !d.state.starts_with("running")).count();
        let quarantined = status.domains.iter().filter(|d| d.quarantined.is_some()).count();
        let text = format!(
            "{} domains managed, {down} not running, {quarantined} quarantined{}",
            status.domains.len(),
            if status.connected { "" } else { "; libvirt DISCONNECTED" }
        );
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
        }
    }
}

async fn tick(interval: Option<&mut tokio::time::Interval>) {
    match interval {
        Some(i) => {
            i.tick().await;
        }
        None => std::future::pending().await,
    }
}
