//! The one start-up of both long-running front ends (`run`, `operator`): the host-wide lock and
//! state directory, the engine on the real backends (libvirt, the host network of this
//! namespace, diagnosis — the engine itself builds none of them), the metrics and health
//! endpoint and the control socket.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use tokio::task::JoinHandle;
use virtwarden_policies::DesiredState;

use crate::act::remediation::Registry;
use crate::engine::connect::Connector;
use crate::engine::{Backends, Engine, EngineConfig, EngineHandle};
use crate::exit;
use crate::http::Probes;
use crate::libvirt::connect::LibvirtConnector;
use crate::lock::HostLock;

/// The real backends for a service on libvirt at `uri`: hyper's client for `http` health
/// probes, the host-network task when `network` is on, and diagnosis of failed repairs except on libvirt's test driver (whose domains' paths
/// are not on this host and whose network is not real).
pub fn backends(connector: Arc<dyn Connector>, remediations: Registry, uri: &str, network: bool) -> Backends {
    let mut backends = Backends::new(connector, remediations);
    backends.http_probe = Some(Arc::new(crate::probe::http::HyperGet));
    if network {
        backends.network = Some(crate::hostnet::netlink_runner());
    }
    if !crate::libvirt::is_test_uri(uri) {
        backends.explain = Some(Arc::new(crate::diagnose::StartFailureExplainer { network }));
    }
    backends
}

/// The host-wide lock and the private state directory, taken before anything else is read, so
/// a second writer exits at once (1) naming the holder. `who` names the command in the lock.
pub fn prepare(lock_file: &Path, who: &str, state_dir: &Path) -> Result<HostLock, i32> {
    let lock = crate::lock::acquire(lock_file, who).map_err(|e| {
        eprintln!("error: {e}");
        exit::RUNTIME
    })?;
    if let Err(e) = crate::fsutil::ensure_private_dir(state_dir) {
        eprintln!("error: cannot create state directory {}: {e}", state_dir.display());
        return Err(exit::RUNTIME);
    }
    Ok(lock)
}

/// What a service starts with.
pub struct Start<'a> {
    /// `run` or `operator`, for messages.
    pub who: &'static str,
    pub uri: &'a str,
    /// Reconcile the host network of this namespace.
    pub network: bool,
    pub config: EngineConfig,
    pub remediations: Registry,
    pub desired: DesiredState,
    pub metrics_addr: Option<SocketAddr>,
    /// Where the control socket goes.
    pub state_dir: &'a Path,
    /// Where the control socket sends `virtwarden reload` requests; `None` refuses them (the
    /// operator, whose policies come from the API server).
    pub reloads: Option<tokio::sync::mpsc::UnboundedSender<crate::control::ReloadReply>>,
}

/// A started engine with its endpoint and control socket.
pub struct Running {
    pub engine: EngineHandle,
    pub task: JoinHandle<()>,
}

/// Start the engine on the real backends, its metrics and health endpoint, and its control
/// socket — the same way for both front ends. An endpoint that cannot be bound stops the
/// engine again (exit 1); a control socket that cannot be made is a warning (`release` then
/// edits the memory under the lock instead).
/// `probes` makes what the endpoint answers from (the engine alone for `run`; the operator adds
/// the API server's health).
pub async fn start<P: Probes>(s: Start<'_>, probes: impl FnOnce(&EngineHandle) -> P) -> Result<Running, i32> {
    let connector = Arc::new(LibvirtConnector { uri: s.uri.to_string() });
    let (engine, task) = Engine::spawn_with(backends(connector, s.remediations, s.uri, s.network), s.desired, s.config);
    if let Some(addr) = s.metrics_addr {
        match crate::http::serve(addr, probes(&engine)).await {
            Ok(bound) => tracing::info!(%bound, "serving /metrics, /healthz, /readyz"),
            Err(e) => {
                eprintln!("error: cannot serve metrics on {addr}: {e}");
                engine.shutdown();
                let _ = task.await;
                return Err(exit::RUNTIME);
            }
        }
    }
    match crate::control::serve(s.state_dir, engine.clone(), s.reloads) {
        Ok(path) => tracing::debug!(path = %path.display(), "control socket ready"),
        Err(e) => tracing::warn!(%e, who = s.who, "no control socket; `virtwarden release` cannot reach this service"),
    }
    hand_back_startup_pages(engine.clone());
    Ok(Running { engine, task })
}

/// Once the first resync is done, give back the file pages only start-up touched
/// (`startup_pages.rs`): an idle service keeps its working set, not its start-up.
fn hand_back_startup_pages(engine: EngineHandle) {
    tokio::spawn(async move {
        // Checked each minute as well as on every status change, so a handle held here never
        // keeps an engine alive that stopped before it was ready.
        let e = engine.clone();
        while engine.wait_for(std::time::Duration::from_secs(60), |_| e.is_ready()).await.is_none() {
            if engine.is_stopped() {
                return;
            }
        }
        if let Ok(done) = tokio::task::spawn_blocking(crate::startup_pages::hand_back).await {
            tracing::debug!(mappings = done.mappings, mib = done.bytes >> 20, "handed back start-up pages");
        }
    });
}
