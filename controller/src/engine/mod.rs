//! The reconcile engine shared by the host service and the operator: triggers (libvirt events,
//! policy reloads, a periodic resync) only say what to look at again; per-domain workers decide
//! from freshly observed state. The engine never imports a front end.

pub mod connect;
pub mod metrics;
mod network;
pub mod status;
mod worker;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use virtwarden_policies::{DesiredState, ManagedDomain};

use crate::act::remediation::Registry;
use crate::hypervisor::{Hypervisor, HypervisorError};
use crate::libvirt::events::HypervisorEvent;
use crate::observe::ObservedHost;
use crate::plan::restart::Tick;
use connect::{Connection, Connector};
use metrics::Metrics;
use status::{DomainStatus, StatusBook, StatusReport};
use worker::{Kick, Worker};

/// How the engine runs.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Full resync period.
    pub resync: Duration,
    /// Where to write the status file (atomically), if anywhere.
    pub status_path: Option<PathBuf>,
    /// How long shutdown waits for in-flight actions.
    pub shutdown_grace: Duration,
    /// Concurrent blocking libvirt calls.
    pub libvirt_concurrency: usize,
    /// Reconcile the host network (bridges, taps, forwarding) of this process's namespace.
    pub network: bool,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            resync: Duration::from_secs(60),
            status_path: None,
            shutdown_grace: Duration::from_secs(30),
            libvirt_concurrency: 8,
            network: false,
        }
    }
}

enum Msg {
    Reload {
        desired: DesiredState,
        clear_quarantine: bool,
    },
    PolicyRejected(String),
    Resync,
    Shutdown,
    Connected(Connection),
    ConnectionLost(String),
    Observed(Result<ObservedHost, HypervisorError>),
    /// Look at every managed domain again (the network changed under them).
    KickAll,
    /// Liveness probe: the loop answers when it is not stuck.
    Ping(tokio::sync::oneshot::Sender<()>),
}

/// State shared by the engine loop and its workers.
pub(crate) struct Shared {
    hv: RwLock<Option<Arc<dyn Hypervisor>>>,
    book: Mutex<StatusBook>,
    meta: Mutex<StatusReport>,
    /// Bumped on every status change; the status writer and waiters watch it.
    status_version: watch::Sender<u64>,
    pub(crate) metrics: Metrics,
    pub(crate) remediations: Registry,
    origin: Instant,
    ready: AtomicBool,
    reconnecting: AtomicBool,
    libvirt_slots: Semaphore,
    msg: UnboundedSender<Msg>,
    /// The latest host-network observation, for domain workers' bridge checks.
    net_snapshot: RwLock<Option<crate::observe::ObservedNet>>,
}

impl Shared {
    pub(crate) fn hypervisor(&self) -> Option<Arc<dyn Hypervisor>> {
        self.hv.read().ok().and_then(|g| g.clone())
    }

    /// The engine's monotonic clock.
    pub(crate) fn tick(&self) -> Tick {
        Instant::now().saturating_duration_since(self.origin)
    }

    pub(crate) fn instant_at(&self, t: Tick) -> Instant {
        self.origin + t
    }

    pub(crate) fn wall_clock_at(&self, t: Tick) -> DateTime<Utc> {
        let delta = t.saturating_sub(self.tick());
        Utc::now() + chrono::Duration::from_std(delta).unwrap_or_default()
    }

    /// Change one domain's status; returns what `f` returns.
    /// Change a managed domain's status. A domain that is no longer managed has no entry and
    /// stays absent: a worker finishing its last pass after a reload cannot resurrect it.
    pub(crate) fn update_domain(&self, name: &str, f: impl FnOnce(&mut DomainStatus)) {
        {
            let mut book = self.book.lock().unwrap_or_else(|p| p.into_inner());
            let Some(entry) = book.get_mut(name) else { return };
            f(entry);
            let quarantined = book.values().filter(|d| d.quarantined.is_some()).count();
            self.metrics.quarantined.set(quarantined as i64);
        }
        self.mark_dirty();
    }

    /// Start tracking a newly managed domain.
    fn add_domain(&self, status: DomainStatus) {
        self.book.lock().unwrap_or_else(|p| p.into_inner()).insert(status.name.clone(), status);
        self.mark_dirty();
    }

    pub(crate) fn update_network(&self, f: impl FnOnce(&mut status::NetworkStatus)) {
        {
            let mut meta = self.meta.lock().unwrap_or_else(|p| p.into_inner());
            f(meta.network.get_or_insert_with(Default::default));
        }
        self.mark_dirty();
    }

    pub(crate) fn net_snapshot(&self) -> Option<crate::observe::ObservedNet> {
        self.net_snapshot.read().ok().and_then(|g| g.clone())
    }

    pub(crate) fn mark_dirty(&self) {
        self.status_version.send_modify(|v| *v = v.wrapping_add(1));
    }

    /// A call failed; if the connection is gone, start reconnecting.
    pub(crate) fn hypervisor_error(&self, e: &HypervisorError) {
        if e.is_connection_lost() {
            let _ = self.msg.send(Msg::ConnectionLost(e.to_string()));
        }
    }

    pub(crate) fn report(&self) -> StatusReport {
        let mut report = self.meta.lock().unwrap_or_else(|p| p.into_inner()).clone();
        report.domains = self.book.lock().unwrap_or_else(|p| p.into_inner()).values().cloned().collect();
        report.updated = Some(Utc::now());
        report
    }
}

/// Talks to a running engine.
#[derive(Clone)]
pub struct EngineHandle {
    shared: Arc<Shared>,
}

impl EngineHandle {
    /// Put a new desired state in force (a good reload). `clear_quarantine` lifts every
    /// quarantine (SIGHUP); domains whose policy changed start afresh anyway.
    pub fn reload(&self, desired: DesiredState, clear_quarantine: bool) {
        let _ = self.shared.msg.send(Msg::Reload { desired, clear_quarantine });
    }

    /// Record a rejected reload; the previous policy stays in force.
    pub fn policy_rejected(&self, error: String) {
        let _ = self.shared.msg.send(Msg::PolicyRejected(error));
    }

    pub fn resync(&self) {
        let _ = self.shared.msg.send(Msg::Resync);
    }

    /// Stop: in-flight actions finish (bounded by the grace period), then the engine returns.
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

    /// Whether the engine loop answers within `timeout` (for the systemd watchdog: a wedged
    /// loop stops the pings and systemd restarts the service).
    pub async fn ping(&self, timeout: Duration) -> bool {
        let (tx, rx) = tokio::sync::oneshot::channel();
        if self.shared.msg.send(Msg::Ping(tx)).is_err() {
            return false;
        }
        matches!(tokio::time::timeout(timeout, rx).await, Ok(Ok(())))
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

struct WorkerEntry {
    managed: ManagedDomain,
    tx: UnboundedSender<Kick>,
    task: JoinHandle<()>,
}

/// The engine loop.
pub struct Engine {
    shared: Arc<Shared>,
    connector: Arc<dyn Connector>,
    config: EngineConfig,
    desired: DesiredState,
    workers: HashMap<String, WorkerEntry>,
    msg_rx: UnboundedReceiver<Msg>,
    events_tx: UnboundedSender<HypervisorEvent>,
    events_rx: UnboundedReceiver<HypervisorEvent>,
    connection: Option<Connection>,
    resync_running: bool,
    net_kicks: Option<UnboundedSender<network::NetKick>>,
    desired_tx: watch::Sender<Arc<DesiredState>>,
}

impl Engine {
    /// Start the engine on the current tokio runtime.
    pub fn spawn(
        connector: Arc<dyn Connector>,
        desired: DesiredState,
        config: EngineConfig,
        remediations: Registry,
    ) -> (EngineHandle, JoinHandle<()>) {
        let (msg_tx, msg_rx) = unbounded_channel();
        let (events_tx, events_rx) = unbounded_channel();
        let meta = StatusReport { pid: std::process::id(), uri: connector.uri(), ..Default::default() };
        let shared = Arc::new(Shared {
            hv: RwLock::new(None),
            book: Mutex::new(StatusBook::new()),
            meta: Mutex::new(meta),
            status_version: watch::channel(0).0,
            metrics: Metrics::default(),
            remediations,
            origin: Instant::now(),
            ready: AtomicBool::new(false),
            reconnecting: AtomicBool::new(false),
            libvirt_slots: Semaphore::new(config.libvirt_concurrency.max(1)),
            msg: msg_tx,
            net_snapshot: RwLock::new(None),
        });
        let engine = Engine {
            shared: shared.clone(),
            connector,
            config,
            desired: DesiredState::default(),
            workers: HashMap::new(),
            msg_rx,
            events_tx,
            events_rx,
            connection: None,
            resync_running: false,
            net_kicks: None,
            desired_tx: watch::channel(Arc::new(DesiredState::default())).0,
        };
        let handle = EngineHandle { shared };
        let task = tokio::spawn(engine.run(desired));
        (handle, task)
    }

    async fn run(mut self, desired: DesiredState) {
        if let Some(path) = self.config.status_path.clone() {
            tokio::spawn(status_writer(self.shared.clone(), path));
        }
        self.set_desired(desired, false);
        if self.config.network {
            let (tx, rx) = unbounded_channel();
            let task = network::NetworkTask::new(self.shared.clone(), self.desired_tx.subscribe(), rx);
            tokio::spawn(task.run());
            self.net_kicks = Some(tx);
        }
        self.start_reconnect("starting".into());
        let mut resync = tokio::time::interval(self.config.resync);
        resync.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        resync.tick().await;
        loop {
            tokio::select! {
                Some(event) = self.events_rx.recv() => self.on_event(event),
                Some(msg) = self.msg_rx.recv() => {
                    if !self.on_msg(msg) {
                        break;
                    }
                }
                _ = resync.tick() => self.start_resync(),
            }
        }
        self.stop().await;
    }

    fn on_event(&mut self, event: HypervisorEvent) {
        match event {
            HypervisorEvent::Lifecycle(ev) => {
                tracing::debug!(domain = %ev.domain, event = %ev.text(), "libvirt event");
                // A started domain has new taps; a stopped one has none. Only managed domains'
                // taps are reconciled.
                if self.workers.contains_key(&ev.domain) {
                    self.kick_network(network::NetKick::Domain(ev.domain.clone()));
                }
                // Unmanaged domains have no worker: their events are ignored.
                if let Some(w) = self.workers.get(&ev.domain) {
                    let _ = w.tx.send(Kick { event: Some(ev), clear_quarantine: false });
                }
            }
            // Guest health evidence; acted on once health checks run in the engine (issue 11).
            HypervisorEvent::Guest(ev) => {
                tracing::debug!(domain = %ev.domain, event = %ev.kind.text(), "libvirt guest event");
            }
            HypervisorEvent::ConnectionClosed { reason } => {
                self.start_reconnect(format!("connection closed ({reason})"))
            }
        }
    }

    /// Returns false when the engine should stop.
    fn on_msg(&mut self, msg: Msg) -> bool {
        match msg {
            Msg::Shutdown => return false,
            Msg::Reload { desired, clear_quarantine } => {
                self.set_desired(desired, clear_quarantine);
                self.start_resync();
            }
            Msg::PolicyRejected(error) => {
                self.shared.meta.lock().unwrap_or_else(|p| p.into_inner()).policy_error = Some(error);
                self.shared.mark_dirty();
            }
            Msg::Resync => self.start_resync(),
            Msg::Ping(reply) => {
                let _ = reply.send(());
            }
            Msg::KickAll => {
                for w in self.workers.values() {
                    let _ = w.tx.send(Kick::default());
                }
            }
            Msg::Connected(conn) => {
                tracing::info!(uri = %self.connector.uri(), events = conn.has_events(), "connected to libvirt");
                if let Ok(mut hv) = self.shared.hv.write() {
                    *hv = Some(conn.hypervisor.clone());
                }
                // Drop the old subscription (if any) only after the new one is in place.
                self.connection = Some(conn);
                self.shared.reconnecting.store(false, Ordering::Relaxed);
                self.shared.metrics.connected.set(1);
                self.shared.meta.lock().unwrap_or_else(|p| p.into_inner()).connected = true;
                self.start_resync();
            }
            Msg::ConnectionLost(why) => self.start_reconnect(why),
            Msg::Observed(result) => {
                self.resync_running = false;
                match result {
                    Ok(host) => self.on_observed(host),
                    Err(e) => {
                        tracing::warn!(%e, "resync failed");
                        self.shared.hypervisor_error(&e);
                    }
                }
            }
        }
        true
    }

    /// Put `desired` in force: start workers for new domains, restart those whose policy
    /// changed (fresh crash-loop state), stop those no longer managed.
    fn set_desired(&mut self, desired: DesiredState, clear_quarantine: bool) {
        let mut keep: HashMap<String, WorkerEntry> = HashMap::new();
        for managed in &desired.domains {
            let name = managed.spec.name.clone();
            match self.workers.remove(&name) {
                Some(entry) if entry.managed == *managed => {
                    if clear_quarantine {
                        let _ = entry.tx.send(Kick { event: None, clear_quarantine: true });
                    }
                    keep.insert(name, entry);
                }
                _ => {
                    let (tx, rx) = unbounded_channel();
                    let worker = Worker::new(self.shared.clone(), managed.clone(), rx);
                    self.shared.add_domain(DomainStatus {
                        name: name.clone(),
                        policy: managed.policy.clone(),
                        state: "unknown".into(),
                        ..Default::default()
                    });
                    let task = tokio::spawn(worker.run());
                    keep.insert(name, WorkerEntry { managed: managed.clone(), tx, task });
                }
            }
        }
        // Workers left over are unmanaged now: closing their channel ends them.
        for (name, _) in self.workers.drain() {
            self.shared.book.lock().unwrap_or_else(|p| p.into_inner()).remove(&name);
        }
        self.workers = keep;
        {
            let mut meta = self.shared.meta.lock().unwrap_or_else(|p| p.into_inner());
            meta.policies = desired.policies.clone();
            meta.policy_error = None;
        }
        self.shared.mark_dirty();
        self.desired_tx.send_replace(Arc::new(desired.clone()));
        self.desired = desired;
    }

    fn kick_network(&self, kick: network::NetKick) {
        if let Some(tx) = &self.net_kicks {
            let _ = tx.send(kick);
        }
    }

    fn start_resync(&mut self) {
        self.kick_network(network::NetKick::AllDomains);
        if self.resync_running {
            return;
        }
        let Some(hv) = self.shared.hypervisor() else {
            return;
        };
        self.resync_running = true;
        let tx = self.shared.msg.clone();
        tokio::task::spawn_blocking(move || {
            let _ = tx.send(Msg::Observed(hv.observe_host()));
        });
    }

    /// A full observation arrived: kick every managed domain that has drift.
    fn on_observed(&mut self, host: ObservedHost) {
        let p = crate::plan::plan(&self.desired, &host);
        let mut kicked = 0;
        for name in p.actions.iter().map(|a| a.domain.as_str()) {
            if let Some(w) = self.workers.get(name) {
                let _ = w.tx.send(Kick::default());
                kicked += 1;
            }
        }
        for managed in &self.desired.domains {
            let name = &managed.spec.name;
            let state = host.domain(name).map(|d| d.state_text()).unwrap_or_else(|| "not defined".into());
            let notes: Vec<String> = p.notes.iter().filter(|n| &n.subject == name).map(|n| n.line()).collect();
            self.shared.update_domain(name, |s| {
                s.state = state;
                s.notes = notes;
            });
        }
        tracing::debug!(domains = host.domains.len(), kicked, "resync done");
        drop(host);
        drop(p);
        release_free_memory();
        if !self.shared.ready.swap(true, Ordering::Relaxed) {
            tracing::info!(managed = self.desired.domains.len(), "first resync done; ready");
            self.shared.mark_dirty();
        }
    }

    fn start_reconnect(&mut self, why: String) {
        if self.shared.reconnecting.swap(true, Ordering::Relaxed) {
            return;
        }
        if self.connection.is_some() || self.shared.ready.load(Ordering::Relaxed) {
            tracing::warn!(reason = %why, uri = %self.connector.uri(), "lost libvirt; reconnecting");
        } else {
            tracing::info!(uri = %self.connector.uri(), "connecting to libvirt");
        }
        if let Ok(mut hv) = self.shared.hv.write() {
            *hv = None;
        }
        self.connection = None;
        self.shared.metrics.connected.set(0);
        self.shared.meta.lock().unwrap_or_else(|p| p.into_inner()).connected = false;
        self.shared.mark_dirty();
        let connector = self.connector.clone();
        let events = self.events_tx.clone();
        let tx = self.shared.msg.clone();
        tokio::spawn(async move {
            let mut delay = Duration::from_millis(100);
            loop {
                let c = connector.clone();
                let ev = events.clone();
                match tokio::task::spawn_blocking(move || c.connect(ev)).await {
                    Ok(Ok(conn)) => {
                        let _ = tx.send(Msg::Connected(conn));
                        return;
                    }
                    Ok(Err(e)) => {
                        tracing::warn!(%e, retry_in = ?delay, "cannot connect to libvirt")
                    }
                    Err(e) => tracing::error!(%e, "connect task failed"),
                }
                if tx.is_closed() {
                    return;
                }
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(5));
            }
        });
    }

    async fn stop(mut self) {
        tracing::info!("stopping: letting in-flight actions finish");
        let tasks: Vec<JoinHandle<()>> = self.workers.drain().map(|(_, w)| w.task).collect();
        let all = futures_join_all(tasks);
        if tokio::time::timeout(self.config.shutdown_grace, all).await.is_err() {
            tracing::warn!(grace = ?self.config.shutdown_grace, "some actions were still running at shutdown");
        }
        if let Some(path) = &self.config.status_path {
            if let Err(e) = status::write_atomically(path, &self.shared.report()) {
                tracing::warn!(%e, "final status write failed");
            }
        }
        self.connection = None;
    }
}

/// A resync allocates and frees a snapshot of every domain; hand the freed pages back so an idle
/// service stays small.
fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only releases free heap memory; it has no preconditions.
    unsafe {
        libc::malloc_trim(0);
    }
}

async fn futures_join_all(tasks: Vec<JoinHandle<()>>) {
    for t in tasks {
        let _ = t.await;
    }
}

/// Writes the status file whenever it changed, at most every 50 ms.
async fn status_writer(shared: Arc<Shared>, path: PathBuf) {
    let mut rx = shared.status_version.subscribe();
    loop {
        if rx.changed().await.is_err() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        let report = shared.report();
        let p = path.clone();
        match tokio::task::spawn_blocking(move || status::write_atomically(&p, &report)).await {
            Ok(Err(e)) => tracing::warn!(%e, "status write failed"),
            Err(e) => tracing::warn!(%e, "status write task failed"),
            Ok(Ok(())) => {}
        }
    }
}
