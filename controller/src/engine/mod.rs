//! The reconcile engine shared by the host service and the operator: triggers (libvirt events,
//! policy reloads, a periodic resync) only say what to look at again; one long-lived worker per
//! managed domain decides from freshly observed state and is the only actor on that domain.
//! What libvirt forgets lives in the durable memory. The engine never imports a front end.
//!
//! Files: `main_loop` (triggers → workers), `worker` (one domain), `connect` (connections and
//! reconnects), `shared` (state they share), `status_writer`, `network` (bridges, taps,
//! forwarding), `clock`, `status`, `metrics`.

pub mod clock;
pub mod connect;
mod main_loop;
pub mod metrics;
pub mod network;
mod shared;
mod startgate;
pub mod status;
mod status_writer;
mod worker;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use tokio::sync::mpsc::unbounded_channel;
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use virtwarden_policies::DesiredState;

use crate::act::calls::CallLimits;
use crate::act::remediation::Registry;
use crate::hypervisor::Hypervisor;
use crate::memory::MemoryStore;
use crate::observe::{ObservedNet, ObservedNetwork};
use clock::{Clock, SystemClock};
use connect::{Connection, Connector};
use metrics::Metrics;
use shared::Shared;
pub use startgate::DEFAULT_MAX_CONCURRENT_STARTS;
use status::StatusReport;

/// How the engine runs.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Full resync period.
    pub resync: Duration,
    /// Where to write the status file (atomically), if anywhere.
    pub status_path: Option<PathBuf>,
    /// Where the durable memory lives (`None`: kept in memory only).
    pub data_dir: Option<PathBuf>,
    /// How long shutdown waits for in-flight actions.
    pub shutdown_grace: Duration,
    /// Concurrent blocking libvirt calls.
    pub libvirt_concurrency: usize,
    /// A libvirt read (state, XML) that takes longer is treated as hung.
    pub read_deadline: Duration,
    /// A libvirt change (start, destroy, define, …) that takes longer is treated as hung.
    pub action_deadline: Duration,
    /// How long an action waits for its record to reach the disk before going ahead anyway.
    pub memory_flush: Duration,
    /// Reconcile the host network (bridges, taps, forwarding) of this process's namespace.
    pub network: bool,
    /// Diagnose a domain whose repair failed (reads its disks, logs and the host). Off for
    /// libvirt's test driver, whose domains' paths are not on this host.
    pub diagnose: bool,
    /// When repairs of an object another writer keeps changing back are backed off.
    pub flap: crate::plan::flap::FlapSettings,
    /// At most this many starts of stopped or crashed domains at once (lower order first).
    pub max_concurrent_starts: usize,
    /// The durable memory of a domain no policy names is dropped this long after (1 h).
    pub memory_grace: Duration,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            resync: Duration::from_secs(60),
            status_path: None,
            data_dir: None,
            shutdown_grace: Duration::from_secs(30),
            libvirt_concurrency: 8,
            read_deadline: Duration::from_secs(15),
            action_deadline: Duration::from_secs(120),
            memory_flush: Duration::from_secs(2),
            network: false,
            diagnose: false,
            flap: Default::default(),
            max_concurrent_starts: DEFAULT_MAX_CONCURRENT_STARTS,
            memory_grace: Duration::from_secs(3600),
        }
    }
}

/// What the engine acts through. Tests hand in fakes that record calls and inject faults.
pub struct Backends {
    /// Opens (and reopens) the hypervisor connection.
    pub connector: Arc<dyn Connector>,
    pub remediations: Registry,
    pub clock: Arc<dyn Clock>,
    /// The durable memory; `None` opens `config.data_dir` (or keeps it in memory).
    pub memory: Option<Arc<MemoryStore>>,
    /// Runs the host-network task (when `config.network`) on chosen backends; `None`: netlink
    /// and `/proc/sys` of this network namespace, with netlink notifications. Tests hand in
    /// recording or fault-injecting [`HostNet`](crate::hostnet::HostNet)/[`Forwarding`](crate::hostnet::Forwarding)
    /// implementations through [`network::NetworkTask::run_with`].
    pub network: Option<NetworkRunner>,
}

/// Starts the network task on its backends (see [`Backends::network`]).
pub type NetworkRunner =
    Arc<dyn Fn(network::NetworkTask) -> futures_util::future::BoxFuture<'static, ()> + Send + Sync>;

impl Backends {
    /// The real backends for `connector`.
    pub fn new(connector: Arc<dyn Connector>, remediations: Registry) -> Self {
        Backends { connector, remediations, clock: Arc::new(SystemClock::new()), memory: None, network: None }
    }
}

enum Msg {
    Reload(DesiredState),
    PolicyRejected(String),
    Resync,
    Shutdown,
    Connected(Connection),
    ConnectionLost(String),
    Networks(Vec<ObservedNetwork>),
    /// Look at every managed domain again (the network changed under them).
    KickAll,
    /// Liveness probe: the loop answers when it is not stuck.
    Ping(oneshot::Sender<()>),
    /// Lift the quarantine of one domain.
    Release {
        domain: String,
        reply: oneshot::Sender<Result<String, String>>,
    },
}

/// Talks to a running engine.
#[derive(Clone)]
pub struct EngineHandle {
    shared: Arc<Shared>,
}

impl EngineHandle {
    /// Put a new desired state in force (a good reload). Workers of domains whose policy
    /// changed take the new policy after their current action (cancellable ones are cancelled);
    /// what is remembered (restarts, quarantine, intent) is kept.
    pub fn reload(&self, desired: DesiredState) {
        let _ = self.shared.msg.send(Msg::Reload(desired));
    }

    /// Record a rejected reload; the previous policy stays in force.
    pub fn policy_rejected(&self, error: String) {
        let _ = self.shared.msg.send(Msg::PolicyRejected(error));
    }

    pub fn resync(&self) {
        let _ = self.shared.msg.send(Msg::Resync);
    }

    /// Lift a domain's quarantine (`virtwarden release`). Ok with what was done, Err when the
    /// domain is not managed here or the engine has stopped.
    pub async fn release(&self, domain: &str) -> Result<String, String> {
        let (reply, rx) = oneshot::channel();
        if self.shared.msg.send(Msg::Release { domain: domain.to_string(), reply }).is_err() {
            return Err("the engine has stopped".into());
        }
        rx.await.unwrap_or_else(|_| Err("the engine has stopped".into()))
    }

    /// Stop: in-flight actions finish or are cancelled (bounded by the grace period).
    pub fn shutdown(&self) {
        let _ = self.shared.msg.send(Msg::Shutdown);
    }

    pub fn status(&self) -> StatusReport {
        self.shared.report()
    }

    pub fn metrics_text(&self) -> String {
        self.shared.metrics.encode()
    }

    /// Connected and one full resync done.
    pub fn is_ready(&self) -> bool {
        self.shared.ready.load(Ordering::Relaxed)
    }

    pub fn is_connected(&self) -> bool {
        self.shared.hypervisor().is_some()
    }

    /// The current hypervisor connection (tests and benchmarks act on the same one).
    pub fn hypervisor(&self) -> Option<Arc<dyn Hypervisor>> {
        self.shared.hypervisor()
    }

    /// Whether the engine loop answers within `timeout`.
    pub async fn ping(&self, timeout: Duration) -> bool {
        let (tx, rx) = oneshot::channel();
        if self.shared.msg.send(Msg::Ping(tx)).is_err() {
            return false;
        }
        matches!(tokio::time::timeout(timeout, rx).await, Ok(Ok(())))
    }

    /// Whether the engine makes progress: its loop answers, and while connected, resync rounds
    /// complete (a round waits only for the managed domains, each bounded by the read
    /// deadline). For the systemd watchdog and `/healthz`: a stuck engine is restarted.
    pub async fn liveness(&self) -> Result<(), String> {
        if !self.ping(Duration::from_secs(1)).await {
            return Err("the engine loop does not answer".into());
        }
        let s = &self.shared;
        let Some(since) = *s.connected_since.lock().unwrap_or_else(|p| p.into_inner()) else {
            return Ok(()); // reconnecting is progress
        };
        let last = s.resync.lock().unwrap_or_else(|p| p.into_inner()).last_done;
        let reference = last.map_or(since, |l| l.max(since));
        let allowed = s.config.resync * 2 + s.config.read_deadline + Duration::from_secs(10);
        let age = reference.elapsed();
        if age > allowed {
            return Err(format!("no resync completed for {}s (allowed {}s)", age.as_secs(), allowed.as_secs()));
        }
        Ok(())
    }

    /// A receiver that sees every status change.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.shared.status_version.subscribe()
    }

    /// Wait until `cond` holds for the status, up to `timeout`; the status when it held.
    /// Wakes on every status change, so callers never sleep and hope.
    pub async fn wait_for(&self, timeout: Duration, cond: impl Fn(&StatusReport) -> bool) -> Option<StatusReport> {
        let mut rx = self.shared.status_version.subscribe();
        let deadline = Instant::now() + timeout;
        loop {
            let report = self.shared.report();
            if cond(&report) {
                return Some(report);
            }
            match tokio::time::timeout_at(deadline, rx.changed()).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) | Err(_) => return None,
            }
        }
    }
}

/// Starts engines.
pub struct Engine;

impl Engine {
    /// Start the engine on the current tokio runtime with the real clock; the memory lives in
    /// `config.data_dir`.
    pub fn spawn(
        connector: Arc<dyn Connector>,
        desired: DesiredState,
        config: EngineConfig,
        remediations: Registry,
    ) -> (EngineHandle, JoinHandle<()>) {
        Self::spawn_with(Backends::new(connector, remediations), desired, config)
    }

    /// Start the engine with the given backends.
    pub fn spawn_with(
        backends: Backends,
        desired: DesiredState,
        config: EngineConfig,
    ) -> (EngineHandle, JoinHandle<()>) {
        let (msg_tx, msg_rx) = unbounded_channel();
        let (memory, problem) = match backends.memory {
            Some(m) => (m, None),
            None => open_memory(config.data_dir.as_deref()),
        };
        let meta = StatusReport {
            pid: std::process::id(),
            uri: backends.connector.uri(),
            data_dir: config.data_dir.as_ref().map(|d| d.display().to_string()),
            ..Default::default()
        };
        let limits =
            Arc::new(CallLimits::new(config.libvirt_concurrency, config.read_deadline, config.action_deadline));
        let gate = Arc::new(startgate::StartGate::new(config.max_concurrent_starts, backends.clock.clone()));
        let shared = Arc::new_cyclic(|weak| Shared {
            prober: crate::probe::Prober::new(worker::conn_guest(weak), crate::probe::DEFAULT_CONCURRENCY),
            hv: RwLock::new(None),
            book: Mutex::new(Default::default()),
            meta: Mutex::new(meta),
            status_version: watch::channel(0).0,
            metrics: Metrics::default(),
            remediations: backends.remediations,
            memory,
            clock: backends.clock,
            limits,
            config: config.clone(),
            ready: AtomicBool::new(false),
            reconnecting: AtomicBool::new(false),
            connected_since: Mutex::new(None),
            msg: msg_tx,
            net_snapshot: RwLock::new(None::<ObservedNet>),
            domains: RwLock::new(Default::default()),
            networks: RwLock::new(Vec::new()),
            resync: Mutex::new(Default::default()),
            net_kicks: RwLock::new(None),
            healthy: RwLock::new(Default::default()),
            startgate: gate,
        });
        if let Some(p) = problem {
            tracing::error!(problem = %p, "virtwarden's memory could not be loaded");
            shared.memory.report_problem(p);
        }
        let handle = EngineHandle { shared: shared.clone() };
        let task = tokio::spawn(
            main_loop::Engine::new(shared, backends.connector, backends.network, config, msg_rx).run(desired),
        );
        (handle, task)
    }
}

/// Open the durable memory in `dir`; problems are reported, never fatal: without a usable
/// directory the engine remembers in memory only and says so in status.
fn open_memory(dir: Option<&std::path::Path>) -> (Arc<MemoryStore>, Option<String>) {
    let Some(dir) = dir else {
        return (Arc::new(MemoryStore::in_memory()), None);
    };
    match MemoryStore::open(dir) {
        Ok((store, problem)) => (Arc::new(store), problem.map(|p| p.to_string())),
        Err(e) => (Arc::new(MemoryStore::in_memory()), Some(format!("{e}; remembering in memory only"))),
    }
}

/// A resync allocates and frees a snapshot of every domain; hand the freed pages back so an idle
/// service stays small.
pub(crate) fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only releases free heap memory; it has no preconditions.
    unsafe {
        libc::malloc_trim(0);
    }
}
